//! An in-memory `hsm.v1.EventService` behind the dev PKI's mutual TLS, for the relay's
//! failure cases that the real service does not produce on demand: a stream that breaks
//! after a few events, an event sent twice (at-least-once), compaction at a chosen seq.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_client::proto as pb;
use hsm_service::testing::DevEnv;
use pb::event_service_server::{EventService, EventServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    /// Retained events, seq ascending.
    events: Vec<pb::Event>,
    last_seq: u64,
    /// Oldest retained seq (everything before was compacted).
    oldest: u64,
    /// Each watch sends at most this many events, then fails with UNAVAILABLE.
    break_after: Option<usize>,
    /// Each watch from seq N > 1 first sends event N - 1 again (at-least-once).
    resend_previous: bool,
    watch_requests: Vec<pb::WatchEventsRequest>,
    prefs: HashMap<String, (bool, u64)>,
}

/// Handle on a running fake.
#[derive(Clone)]
pub struct Fake {
    state: Arc<Mutex<State>>,
    pub addr: SocketAddr,
    backend: SocketAddr,
    /// The accept loops of the TCP relay in front of the service.
    proxy: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// Aborts the relay's connections when its accept loop goes.
struct ProxyConns(Arc<Mutex<tokio::task::JoinSet<()>>>);

impl Drop for ProxyConns {
    fn drop(&mut self) {
        self.0.lock().expect("lock").abort_all();
    }
}

fn matches(e: &pb::Event, kinds: &[String], subject: &str) -> bool {
    (kinds.is_empty() || kinds.contains(&e.kind)) && (subject.is_empty() || e.subject == subject)
}

impl Fake {
    pub async fn start(env: &DevEnv) -> Fake {
        let state = Arc::new(Mutex::new(State {
            oldest: 1,
            ..State::default()
        }));
        let read = |f: &str| std::fs::read(env.pki(f)).expect("dev PKI");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read("server.crt"), read("server.key")))
            .client_ca_root(Certificate::from_pem(read("ca.crt")));
        // The service listens on a private port; clients reach it through a TCP relay
        // on `addr` that `stop` tears down (every connection dropped, as in a restart).
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let backend = inner.local_addr().expect("addr");
        let router =
            Server::builder()
                .tls_config(tls)
                .expect("tls")
                .add_service(EventServiceServer::new(Svc {
                    state: state.clone(),
                }));
        tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(inner)));
        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = front.local_addr().expect("addr");
        let fake = Fake {
            state,
            addr,
            backend,
            proxy: Arc::default(),
        };
        fake.proxy_from(front);
        fake
    }

    fn proxy_from(&self, front: tokio::net::TcpListener) {
        let backend = self.backend;
        let mut tasks = self.proxy.lock().expect("lock");
        let conns = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
        let accept_conns = conns.clone();
        tasks.push(tokio::spawn(async move {
            let _keep = ProxyConns(accept_conns.clone());
            loop {
                let Ok((mut client, _)) = front.accept().await else {
                    return;
                };
                accept_conns.lock().expect("lock").spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
        drop(conns);
    }

    /// Stop serving: every connection dropped, nothing listening on `addr`.
    pub async fn stop(&self) {
        let tasks: Vec<_> = self.proxy.lock().expect("lock").drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serve again on the same address, with the same events.
    pub async fn resume(&self) {
        let front = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the same port");
        self.proxy_from(front);
    }

    /// Append an event; its seq.
    pub fn append(&self, kind: &str, subject: &str) -> u64 {
        let mut s = self.state.lock().expect("lock");
        s.last_seq += 1;
        let seq = s.last_seq;
        s.events.push(pb::Event {
            seq,
            time_ms: 1_798_761_600_000 + seq,
            kind: kind.to_owned(),
            tenant: "login-service".to_owned(),
            subject: subject.to_owned(),
            object_id: format!("cred-{seq}"),
            critical: kind == "credential.created",
            notify: kind == "credential.created",
            details_json: format!("{{\"n\":{seq}}}"),
        });
        seq
    }

    /// Drop every event before `seq`.
    pub fn compact_before(&self, seq: u64) {
        let mut s = self.state.lock().expect("lock");
        s.events.retain(|e| e.seq >= seq);
        s.oldest = seq;
    }

    pub fn break_after(&self, n: Option<usize>) {
        self.state.lock().expect("lock").break_after = n;
    }

    pub fn resend_previous(&self, on: bool) {
        self.state.lock().expect("lock").resend_previous = on;
    }

    /// The `from_seq` of every watch so far.
    pub fn watch_froms(&self) -> Vec<u64> {
        let s = self.state.lock().expect("lock");
        s.watch_requests.iter().map(|r| r.from_seq).collect()
    }

    pub fn watch_requests(&self) -> Vec<pb::WatchEventsRequest> {
        self.state.lock().expect("lock").watch_requests.clone()
    }
}

struct Svc {
    state: Arc<Mutex<State>>,
}

impl Svc {
    fn start_seq(&self, from: u64) -> Result<u64, Status> {
        let s = self.state.lock().expect("lock");
        if from == 0 {
            return Ok(s.oldest);
        }
        if from < s.oldest {
            return Err(Status::out_of_range(format!(
                "from_seq {from} was compacted away; the oldest retained seq is {}",
                s.oldest
            )));
        }
        Ok(from)
    }
}

#[tonic::async_trait]
impl EventService for Svc {
    type WatchEventsStream = ReceiverStream<Result<pb::EventBatch, Status>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        self.state
            .lock()
            .expect("lock")
            .watch_requests
            .push(req.clone());
        let mut next = self.start_seq(req.from_seq)?;
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut sent = 0usize;
            let (resend, break_after) = {
                let s = state.lock().expect("lock");
                (s.resend_previous, s.break_after)
            };
            if resend && next > 1 {
                next -= 1;
            }
            let mut idle_ticks = 0u32;
            loop {
                let (batch, head) = {
                    let s = state.lock().expect("lock");
                    let batch: Vec<pb::Event> = s
                        .events
                        .iter()
                        .filter(|e| e.seq >= next && matches(e, &req.kinds, &req.subject))
                        .take(2)
                        .cloned()
                        .collect();
                    (batch, s.last_seq)
                };
                if batch.is_empty() {
                    if !req.follow {
                        return;
                    }
                    idle_ticks += 1;
                    if idle_ticks % 5 == 0 {
                        let hb = pb::EventBatch {
                            events: vec![],
                            head_seq: head,
                        };
                        if tx.send(Ok(hb)).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                for e in batch {
                    if break_after.is_some_and(|n| sent >= n) {
                        let _ = tx
                            .send(Err(Status::unavailable("fake: stream broken")))
                            .await;
                        return;
                    }
                    next = e.seq + 1;
                    sent += 1;
                    let b = pb::EventBatch {
                        events: vec![e],
                        head_seq: head,
                    };
                    if tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let req = request.into_inner();
        let from = self.start_seq(req.from_seq)?;
        let limit = if req.limit == 0 { 100 } else { req.limit } as usize;
        let s = self.state.lock().expect("lock");
        let mut next_seq = from;
        let mut events = Vec::new();
        for e in s.events.iter().filter(|e| e.seq >= from) {
            if events.len() == limit {
                break;
            }
            next_seq = e.seq + 1;
            if matches(e, &req.kinds, &req.subject) {
                events.push(e.clone());
            }
        }
        Ok(Response::new(pb::ListEventsResponse {
            events,
            next_seq,
            head_seq: s.last_seq,
        }))
    }

    async fn set_notification_preference(
        &self,
        request: Request<pb::SetNotificationPreferenceRequest>,
    ) -> Result<Response<pb::NotificationPreference>, Status> {
        let req = request.into_inner();
        if req.subject.is_empty() {
            return Err(Status::invalid_argument("subject is empty"));
        }
        let mut s = self.state.lock().expect("lock");
        s.prefs
            .insert(req.subject.clone(), (req.every_use, 1_798_761_600));
        Ok(Response::new(pb::NotificationPreference {
            subject: req.subject,
            every_use: req.every_use,
            updated_at: 1_798_761_600,
        }))
    }

    async fn get_notification_preference(
        &self,
        request: Request<pb::GetNotificationPreferenceRequest>,
    ) -> Result<Response<pb::NotificationPreference>, Status> {
        let req = request.into_inner();
        let s = self.state.lock().expect("lock");
        let (every_use, updated_at) = s.prefs.get(&req.subject).copied().unwrap_or((false, 0));
        Ok(Response::new(pb::NotificationPreference {
            subject: req.subject,
            every_use,
            updated_at,
        }))
    }
}
