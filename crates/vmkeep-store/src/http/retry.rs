//! Retries (docs/PROTOCOL.md §7): a request that failed on a connection error, a timeout or a
//! 5xx other than 507 is sent again with exponential backoff (0.2 s doubling, at most 5 s per
//! wait) for at most the configured time, then the last error is returned. Every request of
//! the protocol is idempotent, so a retry is always safe.
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(5);

/// How an attempt failed: with an error worth another attempt, or one that is final.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) retry: bool,
}

impl Failure {
    pub(crate) fn fatal(error: Error) -> Failure {
        Failure {
            error,
            retry: false,
        }
    }

    pub(crate) fn transient(error: Error) -> Failure {
        Failure { error, retry: true }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::fatal(error)
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `retry_for` has passed since the first
/// attempt (the attempts themselves are bounded by the connect and read timeouts).
pub(crate) fn with_retries<T>(
    retry_for: Duration,
    what: &dyn Fn() -> String,
    mut attempt: impl FnMut() -> Result<T, Failure>,
) -> Result<T> {
    let deadline = Instant::now() + retry_for;
    let mut wait = FIRST_WAIT;
    let mut attempts = 1u32;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(f) if !f.retry => return Err(f.error),
            Err(f) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(
                        "{}: giving up after {attempts} attempts: {}",
                        what(),
                        f.error
                    );
                    return Err(f.error);
                }
                let sleep = wait.min(left);
                tracing::warn!(
                    "{}: {} (attempt {attempts}); retrying in {:.1} s",
                    what(),
                    f.error,
                    sleep.as_secs_f64()
                );
                std::thread::sleep(sleep);
                wait = (wait * 2).min(MAX_WAIT);
                attempts += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err() -> Error {
        Error::Network {
            what: "test".into(),
            cause: "down".into(),
        }
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let mut n = 0;
        let r = with_retries(Duration::from_secs(10), &|| "x".into(), || {
            n += 1;
            if n < 3 {
                Err(Failure::transient(err()))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap(), 3);
    }

    #[test]
    fn fatal_failures_are_not_retried() {
        let mut n = 0;
        let r: Result<()> = with_retries(Duration::from_secs(10), &|| "x".into(), || {
            n += 1;
            Err(Failure::fatal(err()))
        });
        assert!(r.is_err());
        assert_eq!(n, 1);
    }

    #[test]
    fn gives_up_after_the_window() {
        let start = Instant::now();
        let mut n = 0;
        let r: Result<()> = with_retries(Duration::from_millis(700), &|| "x".into(), || {
            n += 1;
            Err(Failure::transient(err()))
        });
        assert!(matches!(r, Err(Error::Network { .. })));
        let took = start.elapsed();
        // Waits of 0.2, 0.4, then the 0.1 s left: four attempts.
        assert_eq!(n, 4);
        assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3));
    }
}
