//! Progress observers (defined in vmkeep-io, shared with capture drivers).
pub use vmkeep_io::progress::{NoProgress, Progress};
