//! The one clock of the service, injectable so tests can stand at any time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Wall-clock time in Unix milliseconds, behind a cheap, cloneable handle.
///
/// Production uses [`Clock::system`]; tests use [`Clock::manual`] (a settable time) or
/// [`Clock::from_fn`]. Everything that reads the time (lockout, evidence expiry,
/// approvals, key lifecycle, audit timestamps) takes it from one of these, so one test
/// clock moves them all.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({} ms)", self.now_ms())
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        }))
    }

    /// A clock reading `ms()` (Unix milliseconds).
    pub fn from_fn(ms: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(ms))
    }

    /// A clock standing at `secs` (Unix seconds) until the returned handle moves it.
    pub fn manual(secs: u64) -> (Clock, ManualTime) {
        let t = Arc::new(AtomicU64::new(secs.saturating_mul(1000)));
        let reader = t.clone();
        (
            Clock(Arc::new(move || reader.load(Ordering::SeqCst))),
            ManualTime(t),
        )
    }

    /// A clock reading `secs()` (Unix seconds), for tests that keep their own counter.
    pub fn from_secs_fn(secs: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(move || secs().saturating_mul(1000)))
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Now, in Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        (self.0)()
    }
}

/// The hand that moves a [`Clock::manual`] clock.
#[derive(Clone, Debug)]
pub struct ManualTime(Arc<AtomicU64>);

impl ManualTime {
    /// Stand at `secs` (Unix seconds).
    pub fn set(&self, secs: u64) {
        self.0.store(secs.saturating_mul(1000), Ordering::SeqCst);
    }

    /// Move forward by `secs` seconds.
    pub fn advance(&self, secs: u64) {
        self.0
            .fetch_add(secs.saturating_mul(1000), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::Clock;

    #[test]
    fn manual_clock_moves_seconds_and_milliseconds_together() {
        let (clock, hand) = Clock::manual(1_000);
        assert_eq!((clock.now(), clock.now_ms()), (1_000, 1_000_000));
        hand.advance(5);
        assert_eq!(clock.now(), 1_005);
        hand.set(7);
        assert_eq!(clock.now_ms(), 7_000);
        let copy = clock.clone();
        hand.advance(1);
        assert_eq!(copy.now(), 8);
    }

    #[test]
    fn system_clock_is_after_2024() {
        assert!(Clock::system().now() > 1_700_000_000);
    }
}
