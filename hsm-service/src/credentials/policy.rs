//! The verification policy as pure functions over a credential record: which candidates
//! to compute, and what a match (or a miss) does to the record. No I/O, no clock: the
//! caller passes `now`, so every rule is table-tested in `tests.rs`.
//!
//! Lockout is built so that an attacker who only knows a credential id cannot turn it
//! against the citizen for long (see the README, "Lockout"):
//! - a failure counts for `failure_window_seconds` only (default a day); the record keeps
//!   the times of the failures that still count, so the rule is exact, not a decay guess;
//! - at `lockout_threshold` counted failures the credential locks for a back-off that
//!   doubles with each further counted failure, capped at `max_backoff_seconds`; while
//!   locked it answers LOCKED without HSM work and without counting;
//! - the hard lock (until an officer unlocks) is opt-in (`hard_lockout_threshold`, 0 =
//!   off, the default) and reached only by that many failures inside one window, so a
//!   slow drip of wrong codes never reaches it;
//! - a success forgets every failure.

use std::ops::RangeInclusive;

use crate::config::CredentialsConfig;
use crate::otp::{self, OtpKind};
use crate::store::{CredentialRecord, Update};

/// The verdict on a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Right, and beyond the last accepted step/counter.
    Accepted,
    /// Wrong.
    Rejected,
    /// Right but already used.
    Replayed,
    /// Locked; the code was not checked.
    Locked,
    /// Disabled; the code was not checked.
    Disabled,
}

/// What the caller is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// Failures left before the next lock (temporary, then hard); 0 when locked.
    pub remaining_attempts: u32,
    /// Seconds until a locked credential checks codes again; 0 = until unlocked.
    pub retry_after_seconds: u32,
}

/// The policy, from the config.
pub type Policy = CredentialsConfig;

/// Most failure times a record keeps: beyond the NIST SP 800-63B bound of 100
/// consecutive failures plus every doubling of the back-off, more change nothing. (The
/// store owns the number: it caps format 1 records' counts with it when decoding.)
pub const MAX_COUNTED_FAILURES: usize = crate::store::MAX_FAILURE_TIMES;

/// Refusal without HSM work: disabled, hard-locked, or inside a back-off.
pub fn gate(rec: &CredentialRecord, now: u64, p: &Policy) -> Option<Outcome> {
    if rec.disabled {
        return Some(Outcome {
            verdict: Verdict::Disabled,
            remaining_attempts: remaining(rec, now, p),
            retry_after_seconds: 0,
        });
    }
    if rec.hard_locked {
        return Some(locked(0));
    }
    if rec.locked_until > now {
        let wait = u32::try_from(rec.locked_until - now).unwrap_or(u32::MAX);
        return Some(locked(wait));
    }
    None
}

fn locked(retry_after_seconds: u32) -> Outcome {
    Outcome {
        verdict: Verdict::Locked,
        remaining_attempts: 0,
        retry_after_seconds,
    }
}

/// Whether a failure at `at` still counts at `now`.
fn counts(at: u64, now: u64, p: &Policy) -> bool {
    at.saturating_add(u64::from(p.failure_window_seconds)) > now
}

/// Failures that still count at `now`.
pub fn counted_failures(rec: &CredentialRecord, now: u64, p: &Policy) -> u32 {
    let n = rec
        .failure_times
        .iter()
        .filter(|&&at| counts(at, now, p))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Wrong codes that will be answered REJECTED, from `now`, before the next lock: 0 while
/// locked; down from `lockout_threshold` as failures count; 1 once past it (every further
/// counted failure locks again). Failures leaving the window give attempts back.
pub fn remaining(rec: &CredentialRecord, now: u64, p: &Policy) -> u32 {
    if rec.hard_locked || rec.locked_until > now {
        return 0;
    }
    p.lockout_threshold
        .saturating_sub(counted_failures(rec, now, p))
        .max(1)
}

/// The moving factors to compute for a verification at `now`.
///
/// TOTP: the current step (shifted by the recorded drift) ± `totp_window`. HOTP: from the
/// last accepted counter (so that an immediate replay is recognised as REPLAYED rather
/// than REJECTED) to `next_counter + hotp_look_ahead`.
pub fn verify_window(
    rec: &CredentialRecord,
    now: u64,
    p: &Policy,
) -> Result<RangeInclusive<u64>, otp::OtpError> {
    match rec.kind {
        OtpKind::Totp => {
            let step = otp::totp_step(now, rec.t0, rec.period_seconds)?;
            Ok(otp::totp_window(
                shift(step, rec.drift_steps),
                p.totp_window,
            ))
        }
        OtpKind::Hotp => {
            let start = rec
                .last_accepted
                .map_or(rec.next_counter, |l| l.min(rec.next_counter));
            let extra = u32::try_from(rec.next_counter - start).unwrap_or(u32::MAX);
            otp::hotp_window(start, p.hotp_look_ahead.saturating_add(extra))
        }
    }
}

/// The moving factors searched by a resync: TOTP ± `resync_totp_window` around the
/// current step (ignoring the recorded drift, which is what is being measured); HOTP
/// `next_counter ..= next_counter + resync_hotp_look_ahead`.
pub fn resync_window(
    rec: &CredentialRecord,
    now: u64,
    p: &Policy,
) -> Result<RangeInclusive<u64>, otp::OtpError> {
    match rec.kind {
        OtpKind::Totp => {
            let step = otp::totp_step(now, rec.t0, rec.period_seconds)?;
            Ok(otp::totp_window(step, p.resync_totp_window))
        }
        OtpKind::Hotp => otp::hotp_window(rec.next_counter, p.resync_hotp_look_ahead),
    }
}

fn shift(step: u64, drift: i64) -> u64 {
    if drift >= 0 {
        step.saturating_add(drift.unsigned_abs())
    } else {
        step.saturating_sub(drift.unsigned_abs())
    }
}

/// Apply a verification: `matched` is the step/counter whose code matched, if any. Runs
/// inside the store's atomic update, on the latest state, so concurrent verifications of
/// one code accept it exactly once.
pub fn apply_verify(
    rec: &mut CredentialRecord,
    matched: Option<u64>,
    now: u64,
    p: &Policy,
) -> Update<Outcome> {
    if let Some(o) = gate(rec, now, p) {
        return Update::Keep(o);
    }
    match matched {
        Some(c) if rec.last_accepted.is_none_or(|l| c > l) => {
            accept(rec, c, now);
            if rec.kind == OtpKind::Hotp {
                rec.next_counter = c.saturating_add(1);
            }
            Update::Write(accepted(p))
        }
        Some(_) => Update::Keep(Outcome {
            verdict: Verdict::Replayed,
            remaining_attempts: remaining(rec, now, p),
            retry_after_seconds: 0,
        }),
        None => fail(rec, now, p),
    }
}

/// Apply a resync: `matched` is the step/counter of the SECOND code of a consecutive
/// pair found in the resync window, and `current_step` the TOTP step at `now`.
pub fn apply_resync(
    rec: &mut CredentialRecord,
    matched: Option<u64>,
    current_step: u64,
    now: u64,
    p: &Policy,
) -> Update<Outcome> {
    if let Some(o) = gate(rec, now, p) {
        return Update::Keep(o);
    }
    match matched {
        // Both codes must be unused: the first of the pair beyond the last accepted.
        Some(second)
            if rec
                .last_accepted
                .is_none_or(|l| second.saturating_sub(1) > l) =>
        {
            accept(rec, second, now);
            match rec.kind {
                OtpKind::Hotp => rec.next_counter = second.saturating_add(1),
                OtpKind::Totp => {
                    rec.drift_steps = if second >= current_step {
                        i64::try_from(second - current_step).unwrap_or(i64::MAX)
                    } else {
                        -i64::try_from(current_step - second).unwrap_or(i64::MAX)
                    }
                }
            }
            Update::Write(accepted(p))
        }
        Some(_) => Update::Keep(Outcome {
            verdict: Verdict::Replayed,
            remaining_attempts: remaining(rec, now, p),
            retry_after_seconds: 0,
        }),
        None => fail(rec, now, p),
    }
}

fn accept(rec: &mut CredentialRecord, c: u64, now: u64) {
    rec.last_accepted = Some(c);
    forget_failures(rec);
    rec.updated_at = now;
}

/// A success or an officer's unlock: no failure counts any more, no lock holds.
pub fn forget_failures(rec: &mut CredentialRecord) {
    rec.failures = 0;
    rec.failure_times.clear();
    rec.locked_until = 0;
    rec.hard_locked = false;
}

fn accepted(p: &Policy) -> Outcome {
    Outcome {
        verdict: Verdict::Accepted,
        remaining_attempts: p.lockout_threshold,
        retry_after_seconds: 0,
    }
}

/// Count a failure (forgetting those that left the window) and lock when a threshold is
/// reached.
fn fail(rec: &mut CredentialRecord, now: u64, p: &Policy) -> Update<Outcome> {
    rec.failure_times.retain(|&at| counts(at, now, p));
    if rec.failure_times.len() >= MAX_COUNTED_FAILURES {
        rec.failure_times.remove(0);
    }
    rec.failure_times.push(now);
    rec.failures = u32::try_from(rec.failure_times.len()).unwrap_or(u32::MAX);
    rec.updated_at = now;
    let mut retry_after_seconds = 0;
    if p.hard_lockout_threshold > 0 && rec.failures >= p.hard_lockout_threshold {
        rec.hard_locked = true;
    } else if rec.failures >= p.lockout_threshold {
        let backoff = backoff_seconds(rec.failures, p);
        rec.locked_until = now.saturating_add(u64::from(backoff));
        retry_after_seconds = backoff;
    }
    Update::Write(Outcome {
        verdict: Verdict::Rejected,
        remaining_attempts: remaining(rec, now, p),
        retry_after_seconds,
    })
}

/// A lock the record holds, to tell what a decision changed (see [`LockState::change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockState {
    hard: bool,
    until: u64,
}

/// A lock a decision set, for its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockChange {
    /// Locked until `until` (unix seconds) after `failures` counted failures.
    Temporary {
        /// When the back-off ends.
        until: u64,
        /// Failures counted when it locked.
        failures: u32,
    },
    /// Locked until an officer unlocks it, after `failures` counted failures.
    Hard {
        /// Failures counted when it locked.
        failures: u32,
    },
}

impl LockState {
    /// The lock `rec` holds now.
    pub fn of(rec: &CredentialRecord) -> LockState {
        LockState {
            hard: rec.hard_locked,
            until: rec.locked_until,
        }
    }

    /// The lock a decision set, going from `self` to `after` (`None`: it set none).
    pub fn change(self, after: &CredentialRecord) -> Option<LockChange> {
        if after.hard_locked && !self.hard {
            Some(LockChange::Hard {
                failures: after.failures,
            })
        } else if after.locked_until > self.until {
            Some(LockChange::Temporary {
                until: after.locked_until,
                failures: after.failures,
            })
        } else {
            None
        }
    }
}

/// Back-off after the `failures`-th counted failure (at or past the threshold): base,
/// then doubling, capped.
pub fn backoff_seconds(failures: u32, p: &Policy) -> u32 {
    let doublings = failures.saturating_sub(p.lockout_threshold).min(31);
    let raw = u64::from(p.base_backoff_seconds) << doublings;
    u32::try_from(raw.min(u64::from(p.max_backoff_seconds))).unwrap_or(p.max_backoff_seconds)
}
