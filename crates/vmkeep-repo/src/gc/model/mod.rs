//! The concurrency protocol, checked exhaustively (issue 6): [`protocol`] is the lease / GC /
//! forget / backup protocol of FORMAT.md §13 as a state machine, [`explore`] a small
//! explicit-state model checker. The tests below check every interleaving of small but
//! complete scenarios (backups, prunes with forget and repack, crashes, stalls past the lease
//! timeout, hosts with clock skew up to the allowance, a prune in another PID namespace), and
//! show that the checker finds each defect of the original protocol when its fix is reverted.
//!
//! `VMKEEP_MODEL_DEEP=1 cargo test -p vmkeep-repo --lib gc::model -- --nocapture` runs larger
//! scenarios (more time, two backups with stalls, two prunes with a backup).
pub mod explore;
pub mod protocol;

#[cfg(test)]
mod tests;
