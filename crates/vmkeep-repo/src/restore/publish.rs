//! Durable publishing of restored targets (defined in vmkeep-io, shared with the qcow2 target).
pub use vmkeep_io::target::{create_target_dir, publish};
