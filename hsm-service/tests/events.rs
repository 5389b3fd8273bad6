//! The citizen-notification event stream (issue 12) over mTLS: every kind is emitted by
//! the action that causes it with the documented fields and flags; a follower from 0
//! sees every event of a concurrent workload in order without a gap; a SIGKILLed server
//! loses no acknowledged change's event and a resumed watcher misses nothing; compacted
//! cursors are OUT_OF_RANGE; watches are bounded; tenants are separated; malformed
//! requests are INVALID_ARGUMENT; with PostgreSQL, a follower on one instance sees the
//! events of both in seq order.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::cluster::Cluster;
use hsm_client::proto as pb;
use hsm_client::HsmClient;
use hsm_service::testing::DevEnv;
use pb::event_service_client::EventServiceClient;
use tonic::transport::Channel;
use tonic::Code;

fn events(c: &HsmClient) -> EventServiceClient<Channel> {
    EventServiceClient::new(c.channel())
}

/// Every event from `from` to the head, paging with ListEvents.
async fn list_all(c: &HsmClient, from: u64) -> Vec<pb::Event> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let page = events(c)
            .list_events(pb::ListEventsRequest {
                from_seq: next,
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("list events")
            .into_inner();
        out.extend(page.events);
        if page.next_seq > page.head_seq {
            return out;
        }
        next = page.next_seq;
    }
}

/// A following watch from `from`, collecting until it has seen seq `until` (or the
/// stream ends).
async fn follow_until(c: &HsmClient, from: u64, until: u64) -> Vec<pb::Event> {
    let mut stream = events(c)
        .watch_events(pb::WatchEventsRequest {
            from_seq: from,
            follow: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out: Vec<pb::Event> = Vec::new();
    while out.last().is_none_or(|e| e.seq < until) {
        let batch = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a batch within 20 s")
            .expect("stream ok");
        let Some(batch) = batch else { break };
        out.extend(batch.events);
    }
    out
}

fn details(e: &pb::Event) -> serde_json::Value {
    serde_json::from_str(&e.details_json).expect("details_json is JSON")
}

fn assert_contiguous(seqs: impl IntoIterator<Item = u64>, first: u64) {
    for (i, s) in seqs.into_iter().enumerate() {
        assert_eq!(s, first + i as u64, "seqs are contiguous and ascending");
    }
}

async fn head(c: &HsmClient) -> u64 {
    events(c)
        .list_events(pb::ListEventsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .head_seq
}

async fn set_every_use(
    c: &HsmClient,
    subject: &str,
    every_use: bool,
) -> pb::NotificationPreference {
    events(c)
        .set_notification_preference(pb::SetNotificationPreferenceRequest {
            subject: subject.into(),
            every_use,
        })
        .await
        .expect("set preference")
        .into_inner()
}

async fn state(c: &HsmClient, id: &str, action: pb::CredentialAction, tenant: &str) {
    c.credentials()
        .update_credential_state(pb::UpdateCredentialStateRequest {
            credential_id: id.into(),
            action: action as i32,
            tenant: tenant.into(),
        })
        .await
        .expect("state change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_is_emitted_by_its_action_with_its_fields_and_flags() {
    let env = DevEnv::new();
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let login = common::client(dir, "login-service", addr).await;
    let officer = common::client(dir, "officer-1", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;

    common::enrol(&login, "c1", "citizen-1").await;
    assert_eq!(
        common::verify_hotp(&login, "c1", 0).await.result,
        pb::VerifyResult::Accepted as i32
    );
    let before = events(&login)
        .get_notification_preference(pb::GetNotificationPreferenceRequest {
            subject: "citizen-1".into(),
        })
        .await
        .expect("get preference")
        .into_inner();
    assert!(!before.every_use);
    assert_eq!(before.updated_at, 0, "never set");
    let set = set_every_use(&login, "citizen-1", true).await;
    assert!(set.every_use && set.updated_at > 0);
    assert_eq!(
        common::verify_hotp(&login, "c1", 1).await.result,
        pb::VerifyResult::Accepted as i32
    );
    // Five wrong codes: the fifth locks (the dev lockout threshold).
    for _ in 0..5 {
        let r = common::verify_hotp(&login, "c1", 1000).await;
        assert_ne!(r.result, pb::VerifyResult::Accepted as i32);
    }
    state(
        &officer,
        "c1",
        pb::CredentialAction::Unlock,
        "login-service",
    )
    .await;
    state(&login, "c1", pb::CredentialAction::Disable, "").await;
    state(&login, "c1", pb::CredentialAction::Enable, "").await;
    set_every_use(&login, "citizen-1", false).await;
    // Evidence (credential "evidence-..." created and used) and an assertion.
    common::sign_default_assertion(&login).await;
    login
        .credentials()
        .delete_credential(pb::DeleteCredentialRequest {
            credential_id: "c1".into(),
            tenant: String::new(),
        })
        .await
        .expect("delete");

    let all = list_all(&notifier, 0).await;
    assert_contiguous(all.iter().map(|e| e.seq), 1);
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    let mut expected = vec!["credential.created", "credential.used", "credential.used"];
    expected.extend(["credential.rejected"; 5]);
    expected.extend([
        "credential.locked",
        "credential.unlocked",
        "credential.disabled",
        "credential.enabled",
        "credential.created",
        "credential.used",
        "assertion.signed",
        "credential.deleted",
    ]);
    assert_eq!(kinds, expected);
    for e in &all {
        assert_eq!(e.tenant, "login-service");
        assert_eq!(e.subject, "citizen-1");
        assert!(e.time_ms > 1_600_000_000_000);
        let critical = matches!(
            e.kind.as_str(),
            "credential.created" | "credential.locked" | "credential.deleted"
        );
        assert_eq!(e.critical, critical, "{}", e.kind);
        match e.seq {
            // The evidence credential's enrolment and use, then the assertion (its
            // object is the key).
            13 | 14 => assert!(e.object_id.starts_with("evidence-"), "{e:?}"),
            15 => assert_eq!(e.object_id, env.config.signing.default_key),
            _ => assert_eq!(e.object_id, "c1", "{e:?}"),
        }
    }
    // notify: critical, or the second use (every_use on); the later use has it off.
    let notify: Vec<u64> = all.iter().filter(|e| e.notify).map(|e| e.seq).collect();
    assert_eq!(notify, vec![1, 3, 9, 13, 16]);
    assert_eq!(details(&all[0]), serde_json::json!({"kind": "hotp"}));
    assert_eq!(details(&all[1]), serde_json::json!({}));
    for (i, e) in all[3..8].iter().enumerate() {
        assert_eq!(details(e), serde_json::json!({"failures": i + 1}));
    }
    assert_eq!(details(&all[8]), serde_json::json!({"reason": "failures"}));
    assert_eq!(details(&all[9]), serde_json::json!({"by": "officer"}));
    assert_eq!(
        details(&all[10]),
        serde_json::json!({"by": "login-service"})
    );
    let signed = &all[14];
    let d = details(signed);
    assert_eq!(d["acr"], hsm_service::signing::NSIS_ACR_VALUES[0]);
    assert_eq!(d["aud"], serde_json::json!(["https://bank.example"]));
    assert!(d["kid"].as_str().is_some_and(|k| !k.is_empty()));
    assert_eq!(details(&all[15]), serde_json::json!({}));
    // Nothing carries a code or a seed.
    let text = format!("{all:?}");
    assert!(!text.contains(&common::hotp(common::EVIDENCE_SEED, 1000)));

    // Filters: by kind and by subject.
    let used = events(&notifier)
        .list_events(pb::ListEventsRequest {
            kinds: vec!["credential.used".into()],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(used.events.len(), 3);
    assert!(used.events.iter().all(|e| e.kind == "credential.used"));
    assert_eq!(used.next_seq, used.head_seq + 1);
    let none = events(&notifier)
        .list_events(pb::ListEventsRequest {
            subject: "citizen-2".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(none.events.is_empty());
    // A page of 2 from 3: next_seq after its last.
    let page = events(&notifier)
        .list_events(pb::ListEventsRequest {
            from_seq: 3,
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(page.next_seq, 5);
    // A non-following watch from 0 returns the same events and ends.
    let mut stream = events(&notifier)
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut watched = Vec::new();
    while let Some(b) = stream.message().await.expect("stream") {
        watched.extend(b.events);
    }
    assert_eq!(watched, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_argument_and_roles_are_enforced() {
    let env = DevEnv::new();
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let login = common::client(dir, "login-service", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;
    let officer = common::client(dir, "officer-1", addr).await;
    let long = "s".repeat(129);
    let lists = [
        (
            "unknown kind",
            pb::ListEventsRequest {
                kinds: vec!["credential.nope".into()],
                ..Default::default()
            },
        ),
        (
            "limit > 1000",
            pb::ListEventsRequest {
                limit: 1001,
                ..Default::default()
            },
        ),
        (
            "over-long subject",
            pb::ListEventsRequest {
                subject: long.clone(),
                ..Default::default()
            },
        ),
        (
            "bad subject",
            pb::ListEventsRequest {
                subject: "a b".into(),
                ..Default::default()
            },
        ),
    ];
    for (what, req) in lists {
        let e = events(&notifier).list_events(req).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    let e = events(&notifier)
        .watch_events(pb::WatchEventsRequest {
            kinds: vec!["device.nope".into()],
            ..Default::default()
        })
        .await
        .expect_err("unknown kind");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("device.nope"), "{}", e.message());
    for subject in ["", long.as_str(), "white space"] {
        let e = events(&login)
            .set_notification_preference(pb::SetNotificationPreferenceRequest {
                subject: subject.into(),
                every_use: true,
            })
            .await
            .expect_err("bad subject");
        assert_eq!(e.code(), Code::InvalidArgument, "{subject:?}");
        let e = events(&login)
            .get_notification_preference(pb::GetNotificationPreferenceRequest {
                subject: subject.into(),
            })
            .await
            .expect_err("bad subject");
        assert_eq!(e.code(), Code::InvalidArgument, "{subject:?}");
    }
    // A notifier sets nothing; an officer reads no events.
    let e = events(&notifier)
        .set_notification_preference(pb::SetNotificationPreferenceRequest {
            subject: "citizen-1".into(),
            every_use: true,
        })
        .await
        .expect_err("notifier sets nothing");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = events(&officer)
        .list_events(pb::ListEventsRequest::default())
        .await
        .expect_err("officer");
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_events_and_preferences() {
    let env = DevEnv::new();
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let a = common::client(dir, "login-service", addr).await;
    let b = common::client(dir, "login-service-b", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;
    let auditor = common::client(dir, "auditor", addr).await;
    common::enrol(&a, "x", "citizen-1").await;
    common::verify_hotp(&a, "x", 0).await;
    set_every_use(&a, "citizen-1", true).await;
    common::enrol(&b, "x", "citizen-1").await;

    let of_b = list_all(&b, 0).await;
    assert_eq!(of_b.len(), 1, "B sees only its own enrolment");
    assert!(of_b.iter().all(|e| e.tenant == "login-service-b"));
    let of_a = list_all(&a, 0).await;
    assert_eq!(of_a.len(), 2);
    assert!(of_a.iter().all(|e| e.tenant == "login-service"));
    // B's citizen-1 is another person: A's preference is not B's.
    let pref = events(&b)
        .get_notification_preference(pb::GetNotificationPreferenceRequest {
            subject: "citizen-1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(!pref.every_use);
    assert_eq!(list_all(&notifier, 0).await.len(), 3);
    assert_eq!(list_all(&auditor, 0).await.len(), 3);
    // A watch of B's sees none of A's either.
    let mut stream = events(&b)
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    while let Some(batch) = stream.message().await.expect("stream") {
        assert!(batch.events.iter().all(|e| e.tenant == "login-service-b"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_from_zero_sees_a_concurrent_workload_in_order_without_gaps() {
    let env = DevEnv::new();
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let login = common::client(dir, "login-service", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;
    // The follower starts before anything happened.
    let follower = {
        let n = notifier.clone();
        tokio::spawn(async move {
            // 8 credentials: created, 10 uses and 2 rejections each.
            follow_until(&n, 0, 8 * 13).await
        })
    };
    eight_credentials_at_work(&login, "w").await;
    let seen = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("follower done")
        .expect("follower");
    assert_contiguous(seen.iter().map(|e| e.seq), 1);
    assert_eq!(
        seen,
        list_all(&notifier, 0).await,
        "exactly what was committed"
    );
    // Per credential, its events are in the order its calls were made.
    let mut per: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &seen {
        per.entry(&e.object_id).or_default().push(&e.kind);
    }
    assert_eq!(per.len(), 8);
    for kinds in per.values() {
        assert_eq!(kinds[0], "credential.created");
        assert_eq!(kinds.len(), 13);
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "credential.rejected")
                .count(),
            2
        );
    }
}

/// A following watch of `subject`'s events from 0 (all when empty), collecting `count`;
/// waits `stall` before reading the first batch (a slow client).
async fn follow_count(
    c: &HsmClient,
    subject: &str,
    count: usize,
    stall: Duration,
) -> Vec<pb::Event> {
    let mut stream = events(c)
        .watch_events(pb::WatchEventsRequest {
            follow: true,
            subject: subject.into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::sleep(stall).await;
    let mut out: Vec<pb::Event> = Vec::new();
    while out.len() < count {
        let batch = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a batch within 20 s")
            .expect("stream ok")
            .expect("stream open");
        out.extend(batch.events);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_followers_see_exactly_their_subjects_events_and_a_stalled_one_catches_up() {
    let env = DevEnv::new();
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let login = common::client(dir, "login-service", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;
    // One follower per subject, 50 idle ones, and one that stalls for 3 s while every
    // event is committed (its parked queue overflows: it goes back to the store).
    let per_subject: Vec<_> = (0..8)
        .map(|i| {
            let n = notifier.clone();
            tokio::spawn(async move {
                follow_count(&n, &format!("citizen-{i}"), 13, Duration::ZERO).await
            })
        })
        .collect();
    let idle: Vec<_> = (0..50)
        .map(|i| {
            let n = notifier.clone();
            tokio::spawn(async move {
                follow_count(&n, &format!("nobody-{i}"), 1, Duration::ZERO).await
            })
        })
        .collect();
    let stalled = {
        let n = notifier.clone();
        tokio::spawn(async move { follow_count(&n, "", 8 * 13, Duration::from_secs(3)).await })
    };
    eight_credentials_at_work(&login, "p").await;
    let all = list_all(&notifier, 0).await;
    assert_eq!(all.len(), 8 * 13);
    for (i, f) in per_subject.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("follower done")
            .expect("follower");
        let subject = format!("citizen-{i}");
        let want: Vec<_> = all
            .iter()
            .filter(|e| e.subject == subject)
            .cloned()
            .collect();
        assert_eq!(seen, want, "{subject}: exactly its events, in seq order");
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), stalled)
        .await
        .expect("stalled follower done")
        .expect("stalled follower");
    assert_eq!(seen, all, "the stalled follower misses and repeats nothing");
    for f in &idle {
        assert!(
            !f.is_finished(),
            "an idle follower got an event of another subject"
        );
    }
    for f in idle {
        f.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_cursors_are_out_of_range_and_watches_are_bounded() {
    let mut env = DevEnv::new();
    env.config.events.max_events = 3;
    env.config.events.compact_interval_seconds = 1;
    env.config.events.max_watchers = 2;
    env.config.events.heartbeat_seconds = 1;
    let server = env.start().await;
    let dir = env.dir.path();
    let addr = server.local_addr();
    let login = common::client(dir, "login-service", addr).await;
    let notifier = common::client(dir, "notifier", addr).await;
    common::enrol(&login, "k", "citizen-1").await;
    for n in 0..5 {
        common::verify_hotp(&login, "k", n).await;
    }
    // 6 events, 3 kept once compaction ran.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match events(&notifier)
            .list_events(pb::ListEventsRequest {
                from_seq: 1,
                ..Default::default()
            })
            .await
        {
            Err(e) => break e,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => panic!("never compacted"),
        }
    };
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("oldest retained seq is 4"),
        "{}",
        err.message()
    );
    let mut stream = events(&notifier)
        .watch_events(pb::WatchEventsRequest {
            from_seq: 2,
            ..Default::default()
        })
        .await
        .expect("the watch opens")
        .into_inner();
    let e = stream.message().await.expect_err("first item is the error");
    assert_eq!(e.code(), Code::OutOfRange);
    // From 0: the oldest retained.
    let kept = list_all(&notifier, 0).await;
    assert_eq!(kept.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6]);

    // Two following watches are the limit; a third is RESOURCE_EXHAUSTED.
    let open = |from| {
        let mut c = events(&notifier);
        async move {
            c.watch_events(pb::WatchEventsRequest {
                from_seq: from,
                follow: true,
                ..Default::default()
            })
            .await
        }
    };
    let mut w1 = open(7).await.expect("first").into_inner();
    let w2 = open(7).await.expect("second").into_inner();
    let e = open(7).await.expect_err("third");
    assert_eq!(e.code(), Code::ResourceExhausted);
    // A caught-up follower gets heartbeats with the head.
    let beat = tokio::time::timeout(Duration::from_secs(5), w1.message())
        .await
        .expect("a heartbeat")
        .expect("ok")
        .expect("open");
    assert!(beat.events.is_empty());
    assert_eq!(beat.head_seq, 6);
    // Closing one frees its slot.
    drop(w2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open(7).await {
            Ok(_) => break,
            Err(e)
                if e.code() == Code::ResourceExhausted
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("slot never freed: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_the_watcher_resumes_from_its_last_seq() {
    let dir = tempfile::Builder::new()
        .prefix("hsm-test-events-kill-")
        .tempdir()
        .expect("tempdir");
    let data = dir.path().join("data");
    let (mut child, addr) = common::spawn_dev(&data);
    let login = common::client(&data, "login-service", addr).await;
    let notifier = common::client(&data, "notifier", addr).await;
    const N: usize = 48;
    for i in 0..N {
        common::enrol(&login, &format!("k{i}"), "citizen-1").await;
    }
    // A follower reads while verifications run; the server dies under both.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = {
        let n = notifier.clone();
        tokio::spawn(async move {
            let mut stream = events(&n)
                .watch_events(pb::WatchEventsRequest {
                    follow: true,
                    ..Default::default()
                })
                .await
                .expect("watch")
                .into_inner();
            while let Ok(Some(b)) = stream.message().await {
                for e in b.events {
                    if seen_tx.send(e).is_err() {
                        return;
                    }
                }
            }
        })
    };
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let work: Vec<_> = (0..N)
        .map(|i| {
            let (c, ack) = (login.clone(), acknowledged.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
                let id = format!("k{i}");
                let r = c
                    .credentials()
                    .verify_code(pb::VerifyCodeRequest {
                        credential_id: id.clone(),
                        code: common::hotp(common::EVIDENCE_SEED, 0),
                    })
                    .await;
                if r.is_ok_and(|r| r.into_inner().result == pb::VerifyResult::Accepted as i32) {
                    ack.lock().expect("lock").insert(id);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(120)).await;
    common::kill(&mut child);
    for w in work {
        w.await.expect("task");
    }
    follower.await.expect("follower");
    let mut seen = Vec::new();
    while let Ok(e) = seen_rx.try_recv() {
        seen.push(e);
    }
    assert_contiguous(seen.iter().map(|e| e.seq), 1);
    assert!(seen.len() >= N, "at least the enrolments were seen");

    // Restart on the same data; resume after the last seq seen.
    let (mut child, addr) = common::spawn_dev(&data);
    let notifier = common::client(&data, "notifier", addr).await;
    let last = seen.last().map_or(0, |e| e.seq);
    let top = head(&notifier).await;
    let resumed = if top > last {
        follow_until(&notifier, last + 1, top).await
    } else {
        Vec::new()
    };
    let mut all = seen.clone();
    all.extend(resumed);
    assert_contiguous(all.iter().map(|e| e.seq), 1);
    assert_eq!(
        all,
        list_all(&notifier, 0).await,
        "nothing missing, nothing out of order"
    );
    // Every acknowledged verification's event is there.
    let used: BTreeSet<String> = all
        .iter()
        .filter(|e| e.kind == "credential.used")
        .map(|e| e.object_id.clone())
        .collect();
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.is_subset(&used),
        "acknowledged {acknowledged:?}, events {used:?}"
    );
    // And no event without its change: every used credential refuses its code now.
    let login = common::client(&data, "login-service", addr).await;
    for id in &used {
        let r = common::verify_hotp(&login, id, 0).await;
        assert_eq!(r.result, pb::VerifyResult::Replayed as i32, "{id}");
    }
    common::terminate(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_a_follower_on_one_instance_sees_both_instances_events_in_order() {
    let Some(cl) = Cluster::start().await else {
        return;
    };
    let data = cl.data_dir();
    let a = cl.a.client(&data, "login-service").await;
    let b = cl.b.client(&data, "login-service").await;
    let notifier_b = cl.b.client(&data, "notifier").await;
    let start = head(&notifier_b).await;
    const N: usize = 16;
    let follower = {
        let n = notifier_b.clone();
        tokio::spawn(async move { follow_until(&n, start + 1, start + 2 * N as u64).await })
    };
    let work: Vec<_> = (0..N)
        .map(|i| {
            let c = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                let id = format!("pg-events-{i}");
                common::enrol(&c, &id, "citizen-1").await;
                common::verify_hotp(&c, &id, 0).await;
            })
        })
        .collect();
    for w in work {
        w.await.expect("workload");
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("follower done")
        .expect("follower");
    assert_contiguous(seen.iter().map(|e| e.seq), start + 1);
    assert_eq!(seen.len(), 2 * N);
    let notifier_a = cl.a.client(&data, "notifier").await;
    assert_eq!(
        seen,
        list_all(&notifier_a, start + 1).await,
        "both instances agree"
    );
    for i in 0..N {
        let id = format!("pg-events-{i}");
        let kinds: Vec<&str> = seen
            .iter()
            .filter(|e| e.object_id == id)
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(kinds, ["credential.created", "credential.used"], "{id}");
    }
}

/// 8 credentials `PREFIX0..7` (subjects citizen-0..7) enrolled at once, each used 10
/// times and rejected twice: 8 x 13 events.
async fn eight_credentials_at_work(login: &HsmClient, prefix: &str) {
    let work = (0..8).map(|i| {
        let c = login.clone();
        let id = format!("{prefix}{i}");
        tokio::spawn(async move {
            common::enrol(&c, &id, &format!("citizen-{i}")).await;
            for n in 0..10 {
                common::verify_hotp(&c, &id, n).await;
                if n % 5 == 0 {
                    common::verify_hotp(&c, &id, 5000).await;
                }
            }
        })
    });
    for w in work {
        w.await.expect("workload");
    }
}
