//! `hsmctl events ...`: watch and list the event stream, and the reference notification
//! relay (`watch --cursor-file F --exec CMD`); read and set notification preferences.
//!
//! The relay is at-least-once and in order: it handles one event at a time, records the
//! event's seq in the cursor file only after the event was handled (printed, or `--exec`
//! exited 0), and resumes after the recorded seq when restarted or reconnected. A crash
//! between handling and recording hands that one event over again on restart; the
//! command dedupes by `HSM_EVENT_SEQ` if it must.

use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::{ArgAction, Args, Subcommand};
use hsm_client::cursor::CursorFile;
use hsm_client::proto as pb;
use hsm_client::{ClientError, HsmClient};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tonic::Code;

/// Exit code when the requested start was compacted away (`OUT_OF_RANGE`).
pub const EXIT_OUT_OF_RANGE: u8 = 3;

/// `hsmctl events`.
#[derive(Subcommand)]
pub enum Cmd {
    /// Stream events (one line each, or one JSON object per line with --json); with
    /// --cursor-file and --exec, an at-least-once notification relay.
    Watch(WatchArgs),
    /// One page of events.
    List {
        /// First seq wanted (0 = the oldest retained).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most events (default 100, at most 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only this kind (repeatable; default every kind).
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Only this subject.
        #[arg(long, default_value = "")]
        subject: String,
    },
    /// Notification preferences of a subject (login-service, own tenant).
    #[command(subcommand)]
    Prefs(PrefsCmd),
}

/// `hsmctl events prefs`.
#[derive(Subcommand)]
pub enum PrefsCmd {
    /// Whether SUBJECT is notified at every use (not only of critical events).
    Set {
        /// The citizen's pseudonym.
        subject: String,
        /// true: notify at every use; false: critical events only.
        #[arg(long, required = true, action = ArgAction::Set, value_parser = clap::value_parser!(bool))]
        every_use: bool,
    },
    /// Show SUBJECT's preference (every_use false, updated_at 0 when never set).
    Get {
        /// The citizen's pseudonym.
        subject: String,
    },
}

/// `hsmctl events watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// First seq wanted (0 = the oldest retained); ignored when --cursor-file exists.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Keep the stream open and handle new events as they commit.
    #[arg(long)]
    follow: bool,
    /// Only this kind (repeatable; default every kind).
    #[arg(long = "kind", value_name = "KIND")]
    kinds: Vec<String>,
    /// Only this subject.
    #[arg(long, default_value = "")]
    subject: String,
    /// Resume after the seq stored in FILE and store each handled event's seq there
    /// (atomically, fsync). Missing: start at --from. Corrupt: exit 2.
    #[arg(long, value_name = "FILE")]
    cursor_file: Option<PathBuf>,
    /// Run CMD (with `sh -c`) per event, the event's JSON on stdin and HSM_EVENT_*
    /// variables in its environment; the event counts as handled only when CMD exits 0,
    /// otherwise it is retried with back-off, never skipped.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Kill --exec's CMD after this long (the attempt fails and is retried; 0 = never).
    #[arg(long, default_value = "0", value_parser = parse_duration, value_name = "DURATION")]
    exec_timeout: Duration,
    /// First back-off delay after a failed --exec or a broken stream (doubles each time).
    #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    retry_delay: Duration,
    /// Longest back-off delay.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    retry_max_delay: Duration,
    /// While following: reconnect when nothing (not even a heartbeat) arrived for this
    /// long (0 = never).
    #[arg(long, default_value = "90s", value_parser = parse_duration, value_name = "DURATION")]
    idle_timeout: Duration,
    /// When the cursor (or --from) is older than the oldest retained event, resume from
    /// the oldest retained one (the events in between are lost) instead of exiting 3.
    #[arg(long)]
    resume_from_oldest: bool,
    /// Report heartbeats, reconnections and retries on standard error.
    #[arg(long, short)]
    verbose: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let v: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number with ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(v)),
        "" | "s" => Ok(Duration::from_secs(v)),
        "m" => v
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?}: too long")),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// Run an `events` subcommand.
pub async fn run(client: &HsmClient, cmd: &Cmd, json_out: bool) -> Result<ExitCode, ClientError> {
    match cmd {
        Cmd::Watch(args) => {
            let cursor = open_cursor(args)?;
            watch(client, args, cursor, json_out).await
        }
        Cmd::List {
            from,
            limit,
            kinds,
            subject,
        } => {
            let page = client
                .events()
                .list_events(pb::ListEventsRequest {
                    from_seq: *from,
                    limit: *limit,
                    kinds: kinds.clone(),
                    subject: subject.clone(),
                })
                .await;
            let page = match page {
                Ok(p) => p.into_inner(),
                Err(s) if s.code() == Code::OutOfRange => return Ok(out_of_range(&s, json_out)),
                Err(s) => return Err(s.into()),
            };
            let mut out = std::io::stdout().lock();
            if json_out {
                let events: Vec<Value> = page.events.iter().map(event_json).collect();
                writeln!(
                    out,
                    "{}",
                    json!({ "events": events, "next_seq": page.next_seq, "head_seq": page.head_seq })
                )
                .map_err(ClientError::Output)?;
            } else {
                for e in &page.events {
                    writeln!(out, "{}", event_line(e)).map_err(ClientError::Output)?;
                }
                writeln!(
                    out,
                    "next: --from {} (head seq {})",
                    page.next_seq, page.head_seq
                )
                .map_err(ClientError::Output)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prefs(p) => {
            let pref = match p {
                PrefsCmd::Set { subject, every_use } => client
                    .events()
                    .set_notification_preference(pb::SetNotificationPreferenceRequest {
                        subject: subject.clone(),
                        every_use: *every_use,
                    })
                    .await?
                    .into_inner(),
                PrefsCmd::Get { subject } => client
                    .events()
                    .get_notification_preference(pb::GetNotificationPreferenceRequest {
                        subject: subject.clone(),
                    })
                    .await?
                    .into_inner(),
            };
            if json_out {
                println!(
                    "{}",
                    json!({ "subject": pref.subject, "every_use": pref.every_use, "updated_at": pref.updated_at })
                );
            } else {
                println!(
                    "{}\tevery_use={}\tupdated_at={}",
                    pref.subject,
                    pref.every_use,
                    if pref.updated_at == 0 {
                        "never".to_owned()
                    } else {
                        rfc3339(pref.updated_at.saturating_mul(1000))
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// An event as JSON: every field of `hsm.v1.Event`, `details_json` both as sent and
/// parsed (`details`, the string itself when it is not JSON).
pub fn event_json(e: &pb::Event) -> Value {
    let details: Value = serde_json::from_str(&e.details_json)
        .unwrap_or_else(|_| Value::String(e.details_json.clone()));
    json!({
        "seq": e.seq,
        "time_ms": e.time_ms,
        "kind": e.kind,
        "tenant": e.tenant,
        "subject": e.subject,
        "object_id": e.object_id,
        "critical": e.critical,
        "notify": e.notify,
        "details_json": e.details_json,
        "details": details,
    })
}

fn event_line(e: &pb::Event) -> String {
    let mut flags = String::new();
    if e.critical {
        flags.push_str(" critical");
    }
    if e.notify {
        flags.push_str(" notify");
    }
    format!(
        "{} {} {} tenant={} subject={} object={}{} {}",
        e.seq,
        rfc3339(e.time_ms),
        e.kind,
        e.tenant,
        e.subject,
        e.object_id,
        flags,
        if e.details_json.is_empty() {
            "{}"
        } else {
            &e.details_json
        }
    )
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn out_of_range(s: &tonic::Status, json_out: bool) -> ExitCode {
    let msg = format!(
        "the requested events were compacted away: {} (pass --resume-from-oldest to skip \
         to the oldest retained event, losing the ones in between)",
        s.message()
    );
    if json_out {
        println!(
            "{}",
            json!({ "error": { "code": "OutOfRange", "message": msg } })
        );
    } else {
        eprintln!("hsmctl: {msg}");
    }
    ExitCode::from(EXIT_OUT_OF_RANGE)
}

/// Exponential back-off: `first`, doubled per failure, at most `max`.
struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            max,
            next: first,
        }
    }

    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Statuses after which reconnecting cannot help.
fn permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange
    )
}

/// The watch's cursor file, locked and read (before connecting: a corrupt or busy
/// cursor fails at once, whatever the service's state).
pub fn open_cursor(a: &WatchArgs) -> Result<Option<(CursorFile, Option<u64>)>, ClientError> {
    Ok(match &a.cursor_file {
        Some(path) => Some(CursorFile::open(path)?),
        None => None,
    })
}

/// `events watch`, with the cursor from [`open_cursor`].
pub async fn watch(
    client: &HsmClient,
    a: &WatchArgs,
    cursor: Option<(CursorFile, Option<u64>)>,
    json_out: bool,
) -> Result<ExitCode, ClientError> {
    // The next seq wanted: after the cursor, else --from.
    let mut next = match &cursor {
        Some((_, Some(last))) => last.saturating_add(1),
        _ => a.from,
    };
    let cursor = cursor.map(|(c, _)| c);
    let mut reconnect = Backoff::new(a.retry_delay, a.retry_max_delay);
    let mut attempt_failed = false;
    loop {
        if attempt_failed {
            let d = reconnect.delay();
            if a.verbose {
                eprintln!("hsmctl: reconnecting from seq {next} in {d:?}");
            }
            tokio::time::sleep(d).await;
        }
        attempt_failed = true;
        let req = pb::WatchEventsRequest {
            from_seq: next,
            follow: a.follow,
            kinds: a.kinds.clone(),
            subject: a.subject.clone(),
        };
        let mut stream = match client.events().watch_events(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => match stream_error(&s, a, &mut next, json_out)? {
                Some(code) => return Ok(code),
                None => continue,
            },
        };
        loop {
            let msg = if a.follow && !a.idle_timeout.is_zero() {
                match tokio::time::timeout(a.idle_timeout, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => {
                        eprintln!(
                            "hsmctl: nothing from the service for {:?} (not even a heartbeat): reconnecting",
                            a.idle_timeout
                        );
                        break;
                    }
                }
            } else {
                stream.message().await
            };
            match msg {
                Ok(Some(batch)) => {
                    reconnect.reset();
                    if batch.events.is_empty() && a.verbose {
                        eprintln!("hsmctl: heartbeat, head seq {}", batch.head_seq);
                    }
                    for e in &batch.events {
                        // At-least-once from the service: dedupe by seq.
                        if e.seq < next {
                            continue;
                        }
                        handle(e, a, json_out).await?;
                        if let Some(c) = &cursor {
                            c.store(e.seq)?;
                        }
                        next = e.seq.saturating_add(1);
                    }
                }
                Ok(None) if !a.follow => return Ok(ExitCode::SUCCESS),
                Ok(None) => {
                    eprintln!("hsmctl: the service ended the stream: reconnecting from seq {next}");
                    break;
                }
                Err(s) => {
                    if let Some(code) = stream_error(&s, a, &mut next, json_out)? {
                        return Ok(code);
                    }
                    break;
                }
            }
        }
    }
}

/// What to do after `s`: `Some(exit code)` to stop, `None` to reconnect (from `next`).
fn stream_error(
    s: &tonic::Status,
    a: &WatchArgs,
    next: &mut u64,
    json_out: bool,
) -> Result<Option<ExitCode>, ClientError> {
    if s.code() == Code::OutOfRange {
        if a.resume_from_oldest {
            eprintln!(
                "hsmctl: warning: events from seq {} on were compacted away ({}); resuming from the oldest retained event",
                *next,
                s.message()
            );
            *next = 0;
            return Ok(None);
        }
        return Ok(Some(out_of_range(s, json_out)));
    }
    if permanent(s.code()) {
        return Err(s.clone().into());
    }
    eprintln!("hsmctl: stream broken ({:?}: {})", s.code(), s.message());
    Ok(None)
}

/// Handle one event: print it, or run --exec until it succeeds.
async fn handle(e: &pb::Event, a: &WatchArgs, json_out: bool) -> Result<(), ClientError> {
    let Some(cmd) = &a.exec else {
        let mut out = std::io::stdout().lock();
        let line = if json_out {
            event_json(e).to_string()
        } else {
            event_line(e)
        };
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(ClientError::Output)?;
        return Ok(());
    };
    let input = format!("{}\n", event_json(e));
    let mut backoff = Backoff::new(a.retry_delay, a.retry_max_delay);
    let mut attempt = 1u64;
    loop {
        match exec_once(cmd, e, &input, a.exec_timeout).await {
            Ok(()) => return Ok(()),
            Err(why) => {
                let d = backoff.delay();
                eprintln!(
                    "hsmctl: --exec for event {} ({}) failed (attempt {attempt}: {why}); retrying in {d:?}",
                    e.seq, e.kind
                );
                tokio::time::sleep(d).await;
                attempt += 1;
            }
        }
    }
}

async fn exec_once(cmd: &str, e: &pb::Event, input: &str, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("HSM_EVENT_SEQ", e.seq.to_string())
        .env("HSM_EVENT_KIND", &e.kind)
        .env("HSM_EVENT_TENANT", &e.tenant)
        .env("HSM_EVENT_SUBJECT", &e.subject)
        .env("HSM_EVENT_OBJECT_ID", &e.object_id)
        .env("HSM_EVENT_CRITICAL", e.critical.to_string())
        .env("HSM_EVENT_NOTIFY", e.notify.to_string())
        .env("HSM_EVENT_TIME_MS", e.time_ms.to_string())
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start sh: {err}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    // A command that does not read its stdin closes the pipe early: not a failure.
    let _ = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    let status = if timeout.is_zero() {
        child.wait().await
    } else {
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                let _ = child.kill().await;
                return Err(format!("timed out after {timeout:?}"));
            }
        }
    }
    .map_err(|err| format!("cannot wait for it: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(status.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_backoff() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("5h").is_err());
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let got: Vec<_> = (0..4).map(|_| b.delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.delay().as_millis(), 100);
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }
}
