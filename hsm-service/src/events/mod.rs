//! The outbox's reader side: list and watch the event stream, retention (compaction),
//! and the citizens' notification preferences.
//!
//! Events are *written* by the domain modules inside the unit of work of the change
//! they report (`store::events::emit_in`, next to the audit record); the module doc of
//! `store::events` explains the sequencing that makes seqs increase in commit order with
//! no hole a reader could skip. This module only reads, at each reader's own pace:
//!
//! * a watch never buffers more than one page: it reads a page from the store, sends it
//!   (waiting while the client is slow: the channel holds one batch), and reads the
//!   next; a watcher far behind is served from the store, never from memory, and never
//!   slows a verification (readers take snapshots, writers never wait for them);
//! * a caught-up follower parks in the process's fan-out hub (`fanout`): one tail task
//!   per process reads each newly committed range once (after each local commit that
//!   carried events and every `poll_ms`, so commits of other instances are seen too)
//!   and wakes only the followers whose filter matches one of its events;
//! * open watches are bounded (`[events] max_watchers`, then RESOURCE_EXHAUSTED);
//! * a `from_seq` older than the oldest retained seq is OUT_OF_RANGE naming that seq
//!   (never a silent jump); compaction removes the oldest events in the background.

mod fanout;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use fanout::{Hub, CHUNK_EVENTS, RING_EVENTS};

use crate::common::{Clock, EventKind};
use crate::config::EventsConfig;
use crate::error::{store_failure, Error, Result};
use crate::store::events::{self as outbox, NotificationPref, StoredEvent};
use crate::store::{Store, StoreError};

pub use crate::store::events::{NewEvent, StoredEvent as Event};

/// Most events one ListEvents page returns.
pub const MAX_LIMIT: u32 = 1000;
/// Events per page when the request names no limit.
pub const DEFAULT_LIMIT: u32 = 100;
/// Longest subject a filter or a preference may name.
pub const MAX_SUBJECT_LEN: usize = 128;
/// Events a watch reads from the store per batch.
const WATCH_PAGE: usize = CHUNK_EVENTS;
/// Most stored events one page examines when filtering (bounds a page's work).
const MAX_EXAMINED: usize = 10_000;
/// Events one compaction transaction deletes at most.
const COMPACT_CHUNK: usize = 2048;

/// Whose events a caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A login service: its own tenant's.
    Tenant(String),
    /// A notifier or an auditor: every tenant's.
    All,
}

/// Which events a list or a watch returns.
#[derive(Debug, Clone)]
pub struct Filter {
    scope: Scope,
    kinds: Vec<EventKind>,
    subject: Option<String>,
}

impl Filter {
    /// A filter from a request's fields: `kinds` must all be known, `subject` a valid
    /// subject or empty (then: all).
    pub fn new(scope: Scope, kinds: &[String], subject: &str) -> Result<Filter> {
        let kinds = kinds
            .iter()
            .map(|k| {
                EventKind::parse(k).ok_or_else(|| {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    Error::InvalidArgument(format!(
                        "kinds: unknown kind {:?} (known: {})",
                        k.chars().take(64).collect::<String>(),
                        known.join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let subject = if subject.is_empty() {
            None
        } else {
            check_subject(subject)?;
            Some(subject.to_owned())
        };
        Ok(Filter {
            scope,
            kinds,
            subject,
        })
    }

    /// The one subject it passes, if it names one.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &NewEvent) -> bool {
        let tenant = match &self.scope {
            Scope::All => true,
            Scope::Tenant(t) => *t == e.tenant,
        };
        tenant
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k.as_str() == e.kind))
            && self.subject.as_deref().is_none_or(|s| s == e.subject)
    }
}

/// A subject's pseudonym as preferences and filters take it: 1 to 128 of
/// `A-Z a-z 0-9 . _ : @ -` (the credential subject rule).
pub fn check_subject(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(Error::InvalidArgument(format!(
            "subject must be 1 to {MAX_SUBJECT_LEN} characters"
        )));
    }
    if !subject
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
    {
        return Err(Error::InvalidArgument(
            "subject may contain only A-Z a-z 0-9 . _ : @ -".into(),
        ));
    }
    Ok(())
}

/// One page of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The events that passed the filter, in seq order.
    pub events: Vec<StoredEvent>,
    /// Where the next page starts: the last seq examined + 1.
    pub next_seq: u64,
    /// The newest committed seq when the page was read.
    pub head_seq: u64,
}

/// The event stream of one store.
pub struct Events {
    store: Arc<Store>,
    config: EventsConfig,
    clock: Clock,
    watchers: Arc<Semaphore>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// The stream of `store`; starts the tail task (needs a tokio runtime), which
    /// stops when the returned handle's last clone is dropped.
    pub fn new(store: Arc<Store>, config: EventsConfig, clock: Clock) -> Arc<Events> {
        let events = Arc::new(Events {
            watchers: Arc::new(Semaphore::new(
                usize::try_from(config.max_watchers).unwrap_or(usize::MAX),
            )),
            store: store.clone(),
            config: config.clone(),
            clock,
            hub: Arc::new(Hub::new(0)),
        });
        tokio::spawn(run_tail(
            Arc::downgrade(&events),
            store.event_commits(),
            Duration::from_millis(config.poll_ms),
        ));
        events
    }

    /// Whether any watch is open (then the tail task reads what commits).
    fn watching(&self) -> bool {
        let max = usize::try_from(self.config.max_watchers).unwrap_or(usize::MAX);
        self.watchers.available_permits() < max
    }

    /// The settings.
    pub fn config(&self) -> &EventsConfig {
        &self.config
    }

    /// One page: up to `limit` (0: [`DEFAULT_LIMIT`]; at most [`MAX_LIMIT`]) events
    /// from `from_seq` (0: the oldest retained) that pass `filter`.
    pub async fn list(&self, filter: &Filter, from_seq: u64, limit: u32) -> Result<Page> {
        let limit = match limit {
            0 => DEFAULT_LIMIT,
            l if l > MAX_LIMIT => {
                return Err(Error::InvalidArgument(format!(
                    "limit must be at most {MAX_LIMIT} (is {l})"
                )))
            }
            l => l,
        };
        read_page(&self.store, filter.clone(), from_seq, limit as usize).await
    }

    /// Events from `from_seq` (0: the oldest retained) that pass `filter`, as batches
    /// on a channel; with `follow`, the channel stays open with new events as they
    /// commit and a heartbeat (no events) at least every `heartbeat_seconds`. Refused
    /// with RESOURCE_EXHAUSTED beyond `max_watchers` open watches; the first batch's
    /// OUT_OF_RANGE comes as the first item.
    pub fn watch(
        self: &Arc<Self>,
        filter: Filter,
        from_seq: u64,
        follow: bool,
    ) -> Result<mpsc::Receiver<Result<Page>>> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "too many open event watches (events.max_watchers = {}); retry later",
                self.config.max_watchers
            ))
        })?;
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move { this.run_watch(permit, tx, filter, from_seq, follow).await });
        Ok(rx)
    }

    async fn run_watch(
        self: Arc<Self>,
        _permit: OwnedSemaphorePermit,
        tx: mpsc::Sender<Result<Page>>,
        filter: Filter,
        from_seq: u64,
        follow: bool,
    ) {
        let _open = crate::metrics::OpenWatch::new();
        let heartbeat = Duration::from_secs(self.config.heartbeat_seconds);
        let mut next = from_seq;
        let mut last_sent = Instant::now();
        let mut sent_any = false;
        loop {
            let page = match read_page(&self.store, filter.clone(), next, WATCH_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            // From here on, 0 no longer means "the oldest": resume where this page ended.
            next = page.next_seq;
            let caught_up = page.next_seq > page.head_seq;
            let (empty, head_seq) = (page.events.is_empty(), page.head_seq);
            let created: Vec<u64> = page.events.iter().map(|e| e.event.time_ms).collect();
            if !empty && tx.send(Ok(page)).await.is_err() {
                return;
            }
            let now_ms = self.clock.now_ms();
            for ms in created {
                crate::metrics::event_delivered(ms, now_ms);
            }
            if !empty {
                last_sent = Instant::now();
                sent_any = true;
            }
            if !caught_up {
                continue;
            }
            if !follow {
                if !sent_any {
                    // Nothing matched: still tell the caller where the head is.
                    let _ = tx.send(Ok(heartbeat_page(next, head_seq))).await;
                }
                return;
            }
            // Caught up: park until the hub has events for us, a heartbeat is due, or
            // the client goes away. Unparked (the hub dropped us, or we are older than
            // its ring): read the store again from `next`.
            let Some(mut parking) = self.hub.park(&filter, next) else {
                continue;
            };
            loop {
                let due = last_sent + heartbeat;
                tokio::select! {
                    chunk = parking.rx.recv() => {
                        let Some(chunk) = chunk else { break };
                        let Some(page) = parked_page(&chunk, &filter, &mut next, &self.hub) else {
                            continue;
                        };
                        if tx.send(Ok(page)).await.is_err() {
                            return;
                        }
                        last_sent = Instant::now();
                    }
                    () = tokio::time::sleep_until(due.into()) => {
                        // Read the published seq before draining: everything up to
                        // it is in our queue unless the hub dropped us.
                        let published = self.hub.published();
                        let mut pages = Vec::new();
                        let dropped = loop {
                            match parking.rx.try_recv() {
                                Ok(chunk) => pages.extend(parked_page(&chunk, &filter, &mut next, &self.hub)),
                                Err(mpsc::error::TryRecvError::Empty) => break false,
                                Err(mpsc::error::TryRecvError::Disconnected) => break true,
                            }
                        };
                        if !dropped {
                            next = next.max(published + 1);
                        }
                        if pages.is_empty() {
                            pages.push(heartbeat_page(next, published.max(head_seq)));
                        }
                        for page in pages {
                            if tx.send(Ok(page)).await.is_err() {
                                return;
                            }
                        }
                        last_sent = Instant::now();
                        if dropped {
                            break;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        }
    }

    /// `tenant`'s `subject`'s preference (`every_use` false, `updated_at` 0 if never set).
    pub async fn preference(&self, tenant: &str, subject: &str) -> Result<NotificationPref> {
        check_subject(subject)?;
        let (t, s) = (tenant.to_owned(), subject.to_owned());
        let pref = self
            .store
            .read(move |txn| Ok(outbox::get_pref(txn, &t, &s)?))
            .await
            .map_err(|e| store_failure("reading a notification preference", e))?;
        Ok(pref.unwrap_or(NotificationPref {
            every_use: false,
            updated_at: 0,
        }))
    }

    /// Sets `tenant`'s `subject`'s preference; the next use reads it in its own
    /// transaction.
    pub async fn set_preference(
        &self,
        tenant: &str,
        subject: &str,
        every_use: bool,
    ) -> Result<NotificationPref> {
        check_subject(subject)?;
        let pref = NotificationPref {
            every_use,
            updated_at: self.clock.now(),
        };
        let (t, s) = (tenant.to_owned(), subject.to_owned());
        self.store
            .write(move |txn| outbox::set_pref_in(txn, &t, &s, pref))
            .await
            .map_err(|e| store_failure("writing a notification preference", e))?;
        Ok(pref)
    }

    /// One compaction pass: deletes the events older than `retention_days` and those
    /// beyond `max_events`, in chunks; how many were deleted.
    pub async fn compact(&self) -> Result<u64> {
        let before_ms = self
            .clock
            .now_ms()
            .saturating_sub(self.config.retention_days.saturating_mul(86_400_000));
        let max = self.config.max_events;
        let mut total = 0u64;
        loop {
            let deleted = self
                .store
                .write(move |txn| {
                    let head = outbox::head(txn)?;
                    let before_seq = (head + 1).saturating_sub(max);
                    outbox::compact_in(txn, before_seq, Some(before_ms), COMPACT_CHUNK)
                })
                .await
                .map_err(|e| store_failure("compacting events", e))?;
            total += deleted as u64;
            if deleted < COMPACT_CHUNK {
                return Ok(total);
            }
        }
    }

    /// Runs [`Events::compact`] every `compact_interval_seconds` until the handle is
    /// dropped.
    pub fn spawn_compaction(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = Duration::from_secs(self.config.compact_interval_seconds);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(events) = weak.upgrade() else { return };
                match events.compact().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "events compacted"),
                    Err(e) => tracing::warn!(error = %e, "event compaction failed"),
                }
            }
        })
    }
}

/// The tail task: after each local commit with events and every `poll`, reads the new
/// range once and publishes it to the hub (or skips it when nobody watches).
async fn run_tail(
    events: Weak<Events>,
    mut commits: tokio::sync::watch::Receiver<u64>,
    poll: Duration,
) {
    loop {
        let Some(this) = events.upgrade() else { return };
        let (store, hub, open) = (this.store.clone(), this.hub.clone(), this.watching());
        drop(this);
        let from = hub.tail_next();
        let read = store
            .read(move |txn| {
                let head = outbox::head(txn)?;
                // Nobody to tell, or more than the ring holds: followers read the store.
                if !open || head < from || head - from >= RING_EVENTS as u64 {
                    return Ok((head, None));
                }
                let mut events = Vec::new();
                let mut next = from;
                'read: loop {
                    let chunk = outbox::range(txn, next, CHUNK_EVENTS)?;
                    let full = chunk.len() == CHUNK_EVENTS;
                    for e in chunk {
                        if e.seq > head {
                            break 'read;
                        }
                        next = e.seq + 1;
                        events.push(e);
                    }
                    if !full {
                        break;
                    }
                }
                Ok((head, Some(events)))
            })
            .await;
        match read {
            Ok((head, None)) => hub.skip_to(head),
            Ok((head, Some(events))) => publish(&hub, events, head),
            Err(e) => tracing::warn!(error = %e, "reading new events failed"),
        }
        drop(store);
        tokio::select! {
            changed = commits.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// Publishes `events` (everything committed up to `head` after the hub's tail) in chunks.
fn publish(hub: &Hub, events: Vec<StoredEvent>, head: u64) {
    let mut chunks = events.chunks(CHUNK_EVENTS).peekable();
    if chunks.peek().is_none() {
        hub.publish(Vec::new(), head);
    }
    while let Some(chunk) = chunks.next() {
        let upto = match chunks.peek() {
            Some(_) => chunk.last().map_or(head, |e| e.seq),
            None => head,
        };
        hub.publish(chunk.to_vec(), upto);
    }
}

/// The page a parked follower sends for `chunk`: its events from `next` that pass
/// `filter`; moves `next` past them.
fn parked_page(chunk: &[StoredEvent], filter: &Filter, next: &mut u64, hub: &Hub) -> Option<Page> {
    let events: Vec<StoredEvent> = chunk
        .iter()
        .filter(|e| e.seq >= *next && filter.matches(&e.event))
        .cloned()
        .collect();
    let last = events.last()?.seq;
    *next = last + 1;
    Some(Page {
        events,
        next_seq: *next,
        head_seq: hub.published().max(last),
    })
}

fn heartbeat_page(next_seq: u64, head_seq: u64) -> Page {
    Page {
        events: Vec::new(),
        next_seq,
        head_seq,
    }
}

/// Up to `limit` events of `filter` from `from_seq`, read from one snapshot.
async fn read_page(store: &Store, filter: Filter, from_seq: u64, limit: usize) -> Result<Page> {
    store
        .read(move |txn| {
            let head = outbox::head(txn)?;
            let oldest = outbox::oldest(txn)?;
            let mut next = if from_seq == 0 { oldest } else { from_seq };
            if next < oldest {
                return Ok(Err(Error::OutOfRange(format!(
                    "from_seq {from_seq} was compacted away; the oldest retained seq is {oldest}"
                ))));
            }
            let mut events = Vec::new();
            let mut examined = 0;
            'pages: while next <= head && examined < MAX_EXAMINED {
                let chunk = outbox::range(txn, next, WATCH_PAGE.min(MAX_EXAMINED - examined))?;
                if chunk.is_empty() {
                    break;
                }
                for e in chunk {
                    if e.seq > head {
                        break 'pages;
                    }
                    examined += 1;
                    next = e.seq + 1;
                    if filter.matches(&e.event) {
                        events.push(e);
                        if events.len() == limit {
                            break 'pages;
                        }
                    }
                }
            }
            Ok(Ok(Page {
                events,
                next_seq: next,
                head_seq: head,
            }))
        })
        .await
        .map_err(|e: StoreError| store_failure("reading events", e))?
}
