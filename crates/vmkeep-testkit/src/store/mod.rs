//! `Store` wrappers for tests, stacked on a real store (usually `LocalStore` in a temporary
//! folder): [`FaultStore`] fails writes from the Nth on (a crash or an I/O error at every
//! instant), [`IgnoreConditionalStore`] overwrites on `put_if_absent` (as Garage and s3rver do),
//! [`SlowStore`] delays calls (a slow object store, a large repository), [`CountingStore`]
//! counts calls.
mod counting;
mod fault;
mod slow;

pub use counting::{CountingStore, Counts};
pub use fault::{is_injected, FaultStore, IgnoreConditionalStore, INJECTED};
pub use slow::SlowStore;

use vmkeep_store::{Key, ObjectKind};

/// The operations of the `Store` interface (`location` is not one: it does no I/O).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Get,
    GetRange,
    Size,
    Put,
    PutIfAbsent,
    List,
    Delete,
    Flush,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Get,
        Op::GetRange,
        Op::Size,
        Op::Put,
        Op::PutIfAbsent,
        Op::List,
        Op::Delete,
        Op::Flush,
    ];

    /// Whether the operation changes the store.
    pub fn mutates(self) -> bool {
        matches!(self, Op::Put | Op::PutIfAbsent | Op::Delete)
    }
}

/// The kind a call is about: its key's, the listed kind, none for `flush`.
fn kind_of(key: Option<&Key>, listed: Option<ObjectKind>) -> Option<ObjectKind> {
    key.map(|k| k.kind).or(listed)
}
