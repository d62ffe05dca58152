//! Timeouts counted in time this process ran, not wall time.
//!
//! A process stopped (SIGSTOP, `^Z`, a debugger) or a host suspended while it waits for a reply
//! finds, when it runs again, a wall-clock deadline long past and the reply sitting unread in
//! its socket: a plain `tokio::time::timeout` would fail a request the server had answered.
//! So [`within`] waits in ticks of a fraction of the limit and counts the ticks. A tick that
//! overran its length by more than a tick (the process was not running for most of it) still
//! counts, but cannot end the wait: at least one more tick follows, in which a reply that
//! arrived meanwhile is read. A server that never answers still fails after about `limit` of
//! running time (plus one tick per stop).
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Tick length for a limit: a tenth of it, between 10 ms and 1 s.
fn tick_for(limit: Duration) -> Duration {
    (limit / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// `fut`'s output, or None when `limit` of running time passed first (see the module docs).
pub(crate) async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let tick = tick_for(limit);
    let ticks = limit.as_nanos().div_ceil(tick.as_nanos()).max(1);
    let mut counted = 0u128;
    let mut fut = std::pin::pin!(fut);
    loop {
        let started = Instant::now();
        if let Ok(out) = tokio::time::timeout(tick, fut.as_mut()).await {
            return Some(out);
        }
        counted += 1;
        let on_time = started.elapsed() < tick * 2;
        if counted >= ticks && on_time {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_a_tenth_within_bounds() {
        assert_eq!(tick_for(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(tick_for(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(
            tick_for(Duration::from_millis(50)),
            Duration::from_millis(10)
        );
    }

    #[tokio::test]
    async fn a_silent_wait_ends_after_the_limit() {
        let t = Instant::now();
        let r = within(Duration::from_millis(300), std::future::pending::<()>()).await;
        assert!(r.is_none());
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(
            within(Duration::from_millis(300), async { 7 }).await,
            Some(7)
        );
    }

    /// The clock jumps past the limit (as it does for a process stopped while it waits) in the
    /// last tick; the answer arrives meanwhile: not a timeout. A wait without the jump, the
    /// same length, is one.
    #[tokio::test(start_paused = true)]
    async fn a_jump_past_the_limit_is_not_a_timeout() {
        let limit = Duration::from_millis(200); // ten ticks of 20 ms
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let wait = tokio::spawn(within(limit, rx));
        tokio::time::sleep(Duration::from_millis(190)).await; // nine ticks counted
        tokio::time::advance(Duration::from_secs(5)).await; // stopped for 5 s
        tokio::time::sleep(Duration::from_millis(1)).await; // the wait sees its tick overran
        assert!(!wait.is_finished());
        tx.send(5).unwrap();
        assert_eq!(wait.await.unwrap(), Some(Ok(5)));

        let (_tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let wait = tokio::spawn(within(limit, rx));
        tokio::time::sleep(Duration::from_millis(190)).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(wait.is_finished());
        assert_eq!(wait.await.unwrap(), None);
    }
}
