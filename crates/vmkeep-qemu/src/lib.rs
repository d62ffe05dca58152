//! vmkeep-qemu (under construction)
