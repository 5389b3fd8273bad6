//! One reader per process for the caught-up followers.
//!
//! Why: the first version woke every caught-up follower on each head move and let each
//! read the new range from the store itself. With 1,000 idle followers (a notifier
//! per subject, say) that is 1,000 store reads per group commit, and VerifyCode fell
//! to a quarter of its rate (benches/README.md, issue 12). Now the tail task reads each
//! newly committed range once ([`Hub::publish`]) and hands the chunk only to the
//! followers whose filter matches one of its events; a follower whose filter matches
//! nothing is never woken (its heartbeat timer still runs).
//!
//! Memory stays bounded:
//! * chunks are shared (`Arc`), at most [`CHUNK_EVENTS`] events each;
//! * the hub keeps the last [`RING_EVENTS`] events so a follower that just caught up
//!   from the store can park without reading again; older than that, it reads the
//!   store once more;
//! * a parked follower holds at most [`PARKED_QUEUE`] chunks; when its queue is full
//!   (its client is slow) the hub drops it and the follower goes back to reading the
//!   store at its own pace, from its own cursor: nothing is skipped, nothing repeated;
//! * a jump larger than the ring (a bulk import) drops every follower back to the store
//!   instead of reading the range into memory.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::Filter;
use crate::store::events::StoredEvent;

/// Most events in one chunk (a store read page).
pub(super) const CHUNK_EVENTS: usize = 256;
/// Recent events the hub keeps for followers that just caught up.
pub(super) const RING_EVENTS: usize = 4096;
/// Chunks queued for one parked follower before it is dropped back to the store.
const PARKED_QUEUE: usize = 32;

/// Consecutive committed events, ascending by seq.
pub(super) type Chunk = Arc<Vec<StoredEvent>>;

/// The fan-out point of one process.
#[derive(Debug)]
pub(super) struct Hub {
    inner: Mutex<Inner>,
    /// The newest seq whose chunk has been handed to every parked follower.
    published: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    /// The first seq the hub has not read yet.
    tail_next: u64,
    /// Every committed event with `ring_start <= seq < tail_next`.
    ring: VecDeque<Chunk>,
    ring_start: u64,
    ring_len: usize,
    parked: HashMap<u64, Parked>,
    /// Parked followers by the subject their filter names, so a chunk costs one lookup
    /// per event rather than one filter per follower.
    by_subject: HashMap<String, HashSet<u64>>,
    /// Parked followers whose filter names no subject.
    any_subject: HashSet<u64>,
    next_id: u64,
}

impl Inner {
    fn insert(&mut self, id: u64, parked: Parked) {
        match parked.filter.subject() {
            Some(s) => {
                self.by_subject.entry(s.to_owned()).or_default().insert(id);
            }
            None => {
                self.any_subject.insert(id);
            }
        }
        self.parked.insert(id, parked);
    }

    fn remove(&mut self, id: u64) {
        let Some(parked) = self.parked.remove(&id) else {
            return;
        };
        match parked.filter.subject() {
            Some(s) => {
                if let Some(ids) = self.by_subject.get_mut(s) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_subject.remove(s);
                    }
                }
            }
            None => {
                self.any_subject.remove(&id);
            }
        }
    }

    fn clear(&mut self) {
        self.parked.clear();
        self.by_subject.clear();
        self.any_subject.clear();
    }

    /// The parked followers `chunk` has at least one event for.
    fn wanting(&self, chunk: &[StoredEvent]) -> BTreeSet<u64> {
        let wants = |id: &u64, e: &StoredEvent| {
            self.parked
                .get(id)
                .is_some_and(|p| e.seq >= p.from && p.filter.matches(&e.event))
        };
        let mut out = BTreeSet::new();
        for e in chunk {
            if let Some(ids) = self.by_subject.get(e.event.subject.as_str()) {
                out.extend(ids.iter().filter(|id| wants(id, e)));
            }
        }
        out.extend(
            self.any_subject
                .iter()
                .filter(|id| chunk.iter().any(|e| wants(id, e))),
        );
        out
    }
}

#[derive(Debug)]
struct Parked {
    filter: Filter,
    /// Events before this seq were already sent by the follower itself.
    from: u64,
    tx: mpsc::Sender<Chunk>,
}

/// A follower's place in the hub; leaves it when dropped.
#[derive(Debug)]
pub(super) struct Parking {
    hub: Arc<Hub>,
    id: u64,
    /// Chunks with at least one event for this follower; closed when the hub dropped it.
    pub rx: mpsc::Receiver<Chunk>,
}

impl Drop for Parking {
    fn drop(&mut self) {
        self.hub.lock().remove(self.id);
    }
}

impl Hub {
    /// A hub whose tail starts after `head`.
    pub fn new(head: u64) -> Hub {
        Hub {
            inner: Mutex::new(Inner {
                tail_next: head + 1,
                ring: VecDeque::new(),
                ring_start: head + 1,
                ring_len: 0,
                parked: HashMap::new(),
                by_subject: HashMap::new(),
                any_subject: HashSet::new(),
                next_id: 0,
            }),
            published: AtomicU64::new(head),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only caches behind: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first seq the tail task has not read yet.
    pub fn tail_next(&self) -> u64 {
        self.lock().tail_next
    }

    /// The newest seq handed to every parked follower.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }

    /// Parks a follower that has sent everything before `next`; `None` when the hub
    /// no longer holds every event from `next` (the follower reads the store again).
    pub fn park(self: &Arc<Self>, filter: &Filter, next: u64) -> Option<Parking> {
        let mut inner = self.lock();
        if next < inner.ring_start {
            return None;
        }
        let (tx, rx) = mpsc::channel(PARKED_QUEUE);
        // Backfill what the hub read after the follower's own last read.
        let mut backlog = Vec::new();
        for chunk in &inner.ring {
            backlog.extend(
                chunk
                    .iter()
                    .filter(|e| e.seq >= next && filter.matches(&e.event))
                    .cloned(),
            );
        }
        for part in backlog.chunks(CHUNK_EVENTS) {
            // RING_EVENTS / CHUNK_EVENTS < PARKED_QUEUE: the fresh queue has room.
            if tx.try_send(Arc::new(part.to_vec())).is_err() {
                return None;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.insert(
            id,
            Parked {
                filter: filter.clone(),
                from: next,
                tx,
            },
        );
        Some(Parking {
            hub: self.clone(),
            id,
            rx,
        })
    }

    /// Hands `chunk` (the events `tail_next ..= upto`, ascending) to the followers it
    /// concerns and moves the tail past `upto`.
    pub fn publish(&self, chunk: Vec<StoredEvent>, upto: u64) {
        let mut inner = self.lock();
        if upto < inner.tail_next {
            return;
        }
        let chunk: Chunk = Arc::new(chunk);
        for id in inner.wanting(&chunk) {
            let sent = inner
                .parked
                .get(&id)
                .is_some_and(|p| p.tx.try_send(chunk.clone()).is_ok());
            if !sent {
                // A full queue: the client is slow; it catches up from the store.
                inner.remove(id);
            }
        }
        if !chunk.is_empty() {
            inner.ring_len += chunk.len();
            inner.ring.push_back(chunk);
        }
        while inner.ring_len > RING_EVENTS {
            let Some(old) = inner.ring.pop_front() else {
                break;
            };
            inner.ring_len -= old.len();
            inner.ring_start = old.last().map_or(inner.ring_start, |e| e.seq + 1);
        }
        inner.tail_next = upto + 1;
        drop(inner);
        self.published.fetch_max(upto, Ordering::SeqCst);
    }

    /// Moves the tail past `upto` without reading: no follower is open, or the range is
    /// too large to hold. Every parked follower goes back to reading the store.
    pub fn skip_to(&self, upto: u64) {
        let mut inner = self.lock();
        if upto < inner.tail_next {
            return;
        }
        inner.clear();
        inner.ring.clear();
        inner.ring_len = 0;
        inner.tail_next = upto + 1;
        inner.ring_start = upto + 1;
        drop(inner);
        self.published.fetch_max(upto, Ordering::SeqCst);
    }

    /// Parked followers (for tests).
    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Scope;
    use crate::store::events::NewEvent;

    fn ev(seq: u64, subject: &str) -> StoredEvent {
        StoredEvent {
            seq,
            event: NewEvent {
                time_ms: seq,
                kind: "credential.used".into(),
                tenant: "t".into(),
                subject: subject.into(),
                object_id: format!("c{seq}"),
                critical: false,
                notify: true,
                details_json: "{}".into(),
            },
        }
    }

    fn only(subject: &str) -> Filter {
        Filter::new(Scope::All, &[], subject).unwrap()
    }

    #[test]
    fn only_matching_followers_receive_a_chunk() {
        let hub = Arc::new(Hub::new(0));
        let mut a = hub.park(&only("alice"), 1).unwrap();
        let mut b = hub.park(&only("bob"), 1).unwrap();
        hub.publish(vec![ev(1, "alice"), ev(2, "carol")], 2);
        assert_eq!(a.rx.try_recv().unwrap().len(), 2);
        assert!(b.rx.try_recv().is_err(), "bob's filter matched nothing");
        assert_eq!(hub.published(), 2);
        assert_eq!(hub.tail_next(), 3);
    }

    #[test]
    fn followers_without_a_subject_get_every_chunk_and_leaving_cleans_the_index() {
        let hub = Arc::new(Hub::new(0));
        let all = Filter::new(Scope::All, &[], "").unwrap();
        let mut a = hub.park(&all, 1).unwrap();
        let b = hub.park(&only("bob"), 1).unwrap();
        hub.publish(vec![ev(1, "carol")], 1);
        assert_eq!(a.rx.try_recv().unwrap()[0].seq, 1);
        drop(b);
        assert!(hub.lock().by_subject.is_empty());
        drop(a);
        assert!(hub.lock().any_subject.is_empty());
        assert_eq!(hub.parked(), 0);
    }

    #[test]
    fn a_late_follower_is_backfilled_from_the_ring() {
        let hub = Arc::new(Hub::new(0));
        hub.publish(vec![ev(1, "alice"), ev(2, "alice")], 2);
        hub.publish(vec![ev(3, "alice")], 3);
        // It read the store up to seq 1 before the hub moved on.
        let mut p = hub.park(&only("alice"), 2).unwrap();
        let got: Vec<u64> = p.rx.try_recv().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(got, vec![2, 3]);
        assert!(p.rx.try_recv().is_err());
    }

    #[test]
    fn a_follower_older_than_the_ring_reads_the_store() {
        let hub = Arc::new(Hub::new(0));
        let mut seq = 1;
        while seq <= (RING_EVENTS as u64) + 10 {
            let chunk: Vec<_> = (seq..seq + 10).map(|s| ev(s, "x")).collect();
            hub.publish(chunk, seq + 9);
            seq += 10;
        }
        assert!(hub.park(&only("x"), 1).is_none());
        assert!(hub.park(&only("x"), seq - 10).is_some());
    }

    #[test]
    fn a_full_queue_drops_the_follower_back_to_the_store() {
        let hub = Arc::new(Hub::new(0));
        let mut p = hub.park(&only("alice"), 1).unwrap();
        for s in 1..=(PARKED_QUEUE as u64 + 1) {
            hub.publish(vec![ev(s, "alice")], s);
        }
        assert_eq!(hub.parked(), 0);
        let mut n = 0;
        while let Some(c) = p.rx.blocking_recv() {
            n += c.len();
        }
        assert_eq!(
            n, PARKED_QUEUE,
            "what was queued is still delivered, then closed"
        );
    }

    #[test]
    fn skip_drops_everyone_and_dropping_a_parking_leaves() {
        let hub = Arc::new(Hub::new(0));
        let mut p = hub.park(&only("alice"), 1).unwrap();
        let q = hub.park(&only("bob"), 1).unwrap();
        drop(q);
        assert_eq!(hub.parked(), 1);
        hub.skip_to(100_000);
        assert_eq!(hub.parked(), 0);
        assert!(p.rx.blocking_recv().is_none());
        assert!(hub.park(&only("alice"), 50).is_none());
        assert!(hub.park(&only("alice"), 100_001).is_some());
    }
}
