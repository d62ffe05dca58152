//! vmkeep-testkit: what vmkeep's integration tests share, so each helper exists once.
//!
//! - [`process`]: required programs (a missing one panics with a hint; tests never skip),
//!   commands run to completion, children killed with the test.
//! - [`tools`]: qcow2 images through qemu-img / qemu-io, and nbdinfo as a reference NBD peer.
//! - [`vm`]: a real QEMU (TCG) built from a [`vm::VmBuilder`], the machine-wide one-QEMU lock,
//!   and what a test asks the running VM (status, leftovers of a capture, checkpoint bitmaps).
//! - [`guest`]: the tiny Linux test guest of tests/guest/build.sh and its seqwrite workload:
//!   boot configurations and the point-in-time check of a restored disk.
//! - [`libvirt`]: the system's libvirt daemons (started and stopped by the test when none
//!   runs) and the test guest as a libvirt domain.
//! - [`qmp`]: a small blocking QMP client, independent of the client under test.
//! - [`migration`]: QEMU migration streams: built in QEMU's framing, or taken from a running
//!   test VM through a pipe (background snapshot).
//! - [`conformance`]: the `Store` conformance suite every backend passes.
//! - [`data`]: reproducible pseudo-random data (splitmix64, seeds that can be replayed).
//! - [`image`]: chunk-by-chunk test images (holes, zeros, text, random) for repository tests.
//! - [`s3`]: real S3 servers on loopback: a Garage cluster and moto's server.
//! - [`store`]: `Store` wrappers for tests: faults at the Nth write, ignored conditional writes,
//!   slow calls, counted calls.
//!
//! A dev-dependency only (`publish = false`): nothing here is part of vmkeep's API.

pub mod conformance;
pub mod data;
pub mod guest;
pub mod image;
pub mod libvirt;
pub mod migration;
pub mod process;
pub mod qmp;
pub mod s3;
pub mod store;
pub mod tools;
pub mod vm;
