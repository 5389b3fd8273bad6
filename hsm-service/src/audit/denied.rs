//! Refused calls, aggregated: one `auth.denied` record per caller (certificate
//! fingerprint) and reason per window, with a count, instead of one write per refusal.
//!
//! Any certificate of the client CA can send refused calls as fast as the network
//! allows. Writing each one would hand such a caller the commit path that verifications
//! need; here a refusal costs a map update under a short lock, and the records of a
//! window are written together in one job (see [`super::log::AuditLog::flush_denied`]).
//! Memory is bounded: at most [`MAX_CALLERS_PER_WINDOW`] distinct callers per window;
//! refusals of further callers are only counted, in one overflow record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::audit::{Actor, Details, Event};

/// How long refusals are gathered before their records are written.
pub const DENIED_WINDOW: Duration = Duration::from_secs(1);

/// Distinct (caller, reason) pairs remembered per window.
pub const MAX_CALLERS_PER_WINDOW: usize = 1024;

/// The subject of the overflow record: refusals of callers beyond the cap.
pub const OVERFLOW_SUBJECT: &str = "(further callers)";

#[derive(Hash, PartialEq, Eq)]
struct Caller {
    fingerprint: String,
    reason: String,
}

struct Tally {
    subject: String,
    first_method: String,
    count: u64,
}

#[derive(Default)]
struct Window {
    started_ms: u64,
    callers: HashMap<Caller, Tally>,
    overflow: u64,
}

/// The refusals of the current window.
pub struct DeniedCalls {
    window: Mutex<Window>,
    cap: usize,
}

impl Default for DeniedCalls {
    fn default() -> Self {
        DeniedCalls::with_cap(MAX_CALLERS_PER_WINDOW)
    }
}

impl DeniedCalls {
    /// Remember at most `cap` distinct callers per window.
    pub fn with_cap(cap: usize) -> Self {
        DeniedCalls {
            window: Mutex::new(Window::default()),
            cap,
        }
    }

    /// Count one refusal at `now_ms`. The strings are bounded here, before they are
    /// kept (the records built from them pass the record builders' gate again).
    pub fn note(&self, now_ms: u64, subject: &str, fingerprint: &str, method: &str, reason: &str) {
        use crate::audit::text::{bounded, MAX_FINGERPRINT_LEN, MAX_OBJECT_LEN, MAX_REASON_LEN};
        let key = Caller {
            fingerprint: bounded(fingerprint, MAX_FINGERPRINT_LEN),
            reason: bounded(reason, MAX_REASON_LEN),
        };
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.callers.is_empty() && w.overflow == 0 {
            w.started_ms = now_ms;
        }
        let full = w.callers.len() >= self.cap;
        match w.callers.get_mut(&key) {
            Some(t) => t.count += 1,
            None if full => w.overflow += 1,
            None => {
                let tally = Tally {
                    subject: subject.to_owned(),
                    first_method: bounded(method, MAX_OBJECT_LEN),
                    count: 1,
                };
                w.callers.insert(key, tally);
            }
        }
    }

    /// The records of the window so far (which starts over), stamped `now_ms`.
    pub fn take(&self, now_ms: u64) -> Vec<Event> {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()));
        let window = |d: Details| {
            d.u64("window_start_ms", w.started_ms)
                .u64("window_end_ms", now_ms)
        };
        let mut events: Vec<Event> = w
            .callers
            .into_iter()
            .map(|(caller, t)| {
                Event::new(
                    now_ms,
                    Actor::new(&t.subject, &caller.fingerprint),
                    "auth.denied",
                    &t.first_method,
                )
                .denied()
                .with_details(window(
                    Details::new()
                        .str("reason", &caller.reason)
                        .u64("count", t.count),
                ))
            })
            .collect();
        if w.overflow > 0 {
            events.push(
                Event::new(now_ms, Actor::new(OVERFLOW_SUBJECT, ""), "auth.denied", "*")
                    .denied()
                    .with_details(window(
                        Details::new()
                            .str("reason", "more distinct callers than the window keeps")
                            .u64("count", w.overflow)
                            .u64("callers_kept", self.cap as u64),
                    )),
            );
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(e: &Event) -> u64 {
        let mut chain = crate::audit::Chain::new();
        let r = chain.append(e.clone());
        r.details
            .as_ref()
            .and_then(|d| d.get("count"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }

    #[test]
    fn one_record_per_caller_and_reason_with_counts_that_add_up() {
        let d = DeniedCalls::with_cap(3);
        for i in 0..10_000u64 {
            let caller = i % 5; // 5 callers, only 3 kept
            d.note(
                1000 + i,
                &format!("cn-{caller}"),
                &format!("{caller:064x}"),
                "hsm.v1.AdminService/GetStatus",
                "auditor",
            );
        }
        d.note(20_000, "cn-0", &format!("{:064x}", 0), "m", "officer");
        let events = d.take(30_000);
        assert_eq!(events.len(), 4, "3 kept callers and one overflow record");
        assert_eq!(events.iter().map(count).sum::<u64>(), 10_001);
        assert!(d.take(31_000).is_empty(), "the window starts over");
    }

    #[test]
    fn a_huge_method_name_is_bounded_before_it_is_kept() {
        let d = DeniedCalls::default();
        d.note(1, "cn", "", &"m".repeat(1 << 20), "r");
        let mut chain = crate::audit::Chain::new();
        let r = chain.append(d.take(2).remove(0));
        assert!(r.object.len() <= crate::audit::text::MAX_OBJECT_LEN);
    }
}
