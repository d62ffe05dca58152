//! A small explicit-state model checker: depth-first search over every interleaving of a
//! model's actions, remembering each visited state by a 128-bit fingerprint (as TLC does; the
//! chance that two of n states collide is about n²/2¹²⁹). It checks an invariant in every
//! state and a terminal property in every state without enabled actions, and returns the
//! first violation with the trace of actions that led to it.
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// A model: a start state, the actions enabled in a state, and their effect.
pub trait Model {
    type State: Clone + Hash + Eq;
    type Action: Clone + std::fmt::Debug;

    fn init(&self) -> Self::State;
    /// Every action enabled in `s` (none: `s` is terminal).
    fn actions(&self, s: &Self::State, out: &mut Vec<Self::Action>);
    fn next(&self, s: &Self::State, a: &Self::Action) -> Self::State;
    /// Checked in every reachable state: Err(what is wrong).
    fn invariant(&self, s: &Self::State) -> Result<(), String>;
    /// Checked in every reachable terminal state.
    fn terminal(&self, s: &Self::State) -> Result<(), String>;
}

#[derive(Debug)]
pub struct Violation<A> {
    pub what: String,
    pub trace: Vec<A>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Distinct states visited.
    pub states: u64,
    /// Transitions taken (including into already visited states).
    pub transitions: u64,
    pub terminal_states: u64,
    pub max_depth: usize,
}

fn fingerprint<S: Hash>(s: &S) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0x9e37_79b9_7f4a_7c15_u64.hash(&mut b);
    s.hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

/// Explore every reachable state (up to `max_states`, a safety bound: exceeding it is an
/// error, never a silent truncation).
pub fn explore<M: Model>(m: &M, max_states: u64) -> Result<Stats, Box<Violation<M::Action>>> {
    let mut stats = Stats::default();
    let mut seen: HashSet<u128> = HashSet::new();
    let init = m.init();
    let fail = |what: String, trace: Vec<M::Action>| Box::new(Violation { what, trace });
    if let Err(what) = m.invariant(&init) {
        return Err(fail(what, vec![]));
    }
    seen.insert(fingerprint(&init));
    stats.states = 1;
    // Each frame: a state, its enabled actions, the next one to try, the action that led here.
    struct Frame<S, A> {
        state: S,
        actions: Vec<A>,
        next: usize,
        via: Option<A>,
    }
    let frame = |state: M::State, via: Option<M::Action>| {
        let mut actions = Vec::new();
        m.actions(&state, &mut actions);
        Frame {
            state,
            actions,
            next: 0,
            via,
        }
    };
    let trace = |stack: &[Frame<M::State, M::Action>], last: Option<&M::Action>| {
        let mut t: Vec<M::Action> = stack.iter().filter_map(|f| f.via.clone()).collect();
        t.extend(last.cloned());
        t
    };
    let first = frame(init, None);
    if first.actions.is_empty() {
        stats.terminal_states += 1;
        m.terminal(&first.state).map_err(|w| fail(w, vec![]))?;
    }
    let mut stack = vec![first];
    while let Some(top) = stack.last_mut() {
        if top.next == top.actions.len() {
            stack.pop();
            continue;
        }
        let a = top.actions[top.next].clone();
        top.next += 1;
        let s = m.next(&top.state, &a);
        stats.transitions += 1;
        if !seen.insert(fingerprint(&s)) {
            continue;
        }
        stats.states += 1;
        if stats.states > max_states {
            return Err(fail(
                format!("more than {max_states} states: raise the bound or shrink the model"),
                vec![],
            ));
        }
        if let Err(what) = m.invariant(&s) {
            return Err(fail(what, trace(&stack, Some(&a))));
        }
        let f = frame(s, Some(a.clone()));
        if f.actions.is_empty() {
            stats.terminal_states += 1;
            if let Err(what) = m.terminal(&f.state) {
                return Err(fail(what, trace(&stack, Some(&a))));
            }
        }
        stack.push(f);
        stats.max_depth = stats.max_depth.max(stack.len());
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes each increment a shared counter with a read step and a write step: the
    /// classic lost update. The explorer must find the interleaving that ends at 1.
    struct LostUpdate;

    #[derive(Clone, Hash, PartialEq, Eq, Debug)]
    struct S {
        counter: u8,
        pc: [u8; 2],
        local: [u8; 2],
    }

    impl Model for LostUpdate {
        type State = S;
        type Action = (usize, u8);
        fn init(&self) -> S {
            S {
                counter: 0,
                pc: [0; 2],
                local: [0; 2],
            }
        }
        fn actions(&self, s: &S, out: &mut Vec<(usize, u8)>) {
            for p in 0..2 {
                if s.pc[p] < 2 {
                    out.push((p, s.pc[p]));
                }
            }
        }
        fn next(&self, s: &S, &(p, step): &(usize, u8)) -> S {
            let mut s = s.clone();
            match step {
                0 => s.local[p] = s.counter,
                _ => s.counter = s.local[p] + 1,
            }
            s.pc[p] += 1;
            s
        }
        fn invariant(&self, _: &S) -> Result<(), String> {
            Ok(())
        }
        fn terminal(&self, s: &S) -> Result<(), String> {
            if s.counter == 2 {
                Ok(())
            } else {
                Err(format!("counter is {}", s.counter))
            }
        }
    }

    #[test]
    fn finds_the_lost_update() {
        let v = explore(&LostUpdate, 1000).unwrap_err();
        assert_eq!(v.what, "counter is 1");
        assert_eq!(v.trace.len(), 4, "{:?}", v.trace);
    }
}
