//! Retries (docs/PROTOCOL.md §7): a request that failed on a connection error, a timeout or a
//! 5xx other than 507 is sent again with exponential backoff (0.2 s doubling, at most 5 s per
//! wait) for at most the configured time, then the last error is returned. Every request of
//! the protocol is idempotent, so a retry is always safe.
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Attempts made even when the first ones used up the retry window (unless retries are off).
const MIN_ATTEMPTS: u32 = 3;

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
                let message = describe(&what(), &f.error);
                // A single attempt can outlast the window (a server stopped for longer than the
                // read timeout): one that comes back then still gets its retries.
                if left.is_zero() && (retry_for.is_zero() || attempts >= MIN_ATTEMPTS) {
                    tracing::warn!("{message}: giving up after {attempts} attempts");
                    return Err(f.error);
                }
                let sleep = if left.is_zero() {
                    jittered(wait)
                } else {
                    jittered(wait).min(left)
                };
                tracing::warn!(
                    "{message} (attempt {attempts}); retrying in {:.1} s",
                    sleep.as_secs_f64()
                );
                std::thread::sleep(sleep);
                wait = (wait * 2).min(MAX_WAIT);
                attempts += 1;
            }
        }
    }
}

/// Somewhere in [wait/2, wait], at random: clients that failed together (a server restart)
/// do not all come back in the same instant.
fn jittered(wait: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = match getrandom::getrandom(&mut b) {
        Ok(()) => u16::from_le_bytes(b),
        Err(_) => u16::MAX,
    };
    wait / 2 + (wait / 2).mul_f64(f64::from(r) / f64::from(u16::MAX))
}

/// The error with what was being done in front, unless the error already starts with it.
fn describe(what: &str, error: &Error) -> String {
    let error = error.to_string();
    if error.starts_with(what) {
        error
    } else {
        format!("{what}: {error}")
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
        // Waits of 0.1-0.2, 0.2-0.4, then up to what is left: four or five attempts.
        assert!((4..=5).contains(&n), "{n} attempts");
        assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3));
    }

    #[test]
    fn an_attempt_that_outlasts_the_window_still_gets_retries() {
        let mut n = 0;
        let r = with_retries(Duration::from_millis(50), &|| "x".into(), || {
            n += 1;
            if n == 1 {
                std::thread::sleep(Duration::from_millis(100));
            }
            if n < MIN_ATTEMPTS {
                Err(Failure::transient(err()))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.unwrap(), MIN_ATTEMPTS);
    }

    #[test]
    fn no_window_means_one_attempt() {
        let mut n = 0;
        let r: Result<()> = with_retries(Duration::ZERO, &|| "x".into(), || {
            n += 1;
            Err(Failure::transient(err()))
        });
        assert!(r.is_err());
        assert_eq!(n, 1);
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..100 {
            let j = jittered(Duration::from_millis(400));
            assert!(j >= Duration::from_millis(200) && j <= Duration::from_millis(400));
        }
    }

    #[test]
    fn the_what_is_not_said_twice() {
        let e = Error::Network {
            what: "writing packs/ab".into(),
            cause: "down".into(),
        };
        let m = describe("writing packs/ab", &e);
        assert_eq!(m.matches("writing packs/ab").count(), 1, "{m}");
    }
}
