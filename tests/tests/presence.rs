//! Presence: online/offline with last seen, read deadlines, debounce, multi-device,
//! subscriptions, persistence. Short real TTLs (moka keeps its own clock).

use std::time::{Duration, Instant};

use switchboard_protocol::{ErrorCode, Presence, ServerFrame, client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn};

const FAST: &[&str] = &[
    "--idle-timeout-ms",
    "800",
    "--heartbeat-interval-ms",
    "200",
    "--set",
    "presence.grace_ms=300",
    "--set",
    "presence.last_seen_flush_ms=100",
];

fn presence_of(user: &'static str) -> impl Fn(&ServerFrame) -> Option<Presence> {
    move |f| match &f.kind {
        Some(server_frame::Kind::Presence(p)) if p.user_id == user => Some(p.clone()),
        _ => None,
    }
}

/// Pings `c` every 100 ms while waiting up to `within` for a push matching `f`; keeps pushes.
async fn wait_for<T>(
    c: &mut RawConn,
    within: Duration,
    f: impl Fn(&ServerFrame) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(i) = c.pushes.iter().position(|p| f(p).is_some()) {
            return f(&c.pushes.remove(i));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    }
}

/// Waits `d` while pinging, so `c` itself stays within its read deadline.
async fn keep_alive(c: &mut RawConn, d: Duration) {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    }
}

async fn query(c: &mut RawConn, users: &[&str]) -> Vec<Presence> {
    let req = client_frame::Kind::PresenceQuery(switchboard_protocol::PresenceQuery {
        users: users.iter().map(ToString::to_string).collect(),
    });
    match c.request(req).await {
        server_frame::Kind::Presences(l) => l.presences,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_half_open_client_should_go_offline_once_its_read_deadline_passes() {
    let broker = Broker::start_with(Options::with_args(FAST));
    let (mut bob, _) = broker.raw_as("bob").await;
    bob.create_direct("alice").await;
    // Alice connects, then goes silent without closing: a half-open connection.
    let (alice, _) = broker.raw_as("alice").await;
    let online = wait_for(&mut bob, Duration::from_secs(2), presence_of("alice"))
        .await
        .expect("online push");
    assert!(online.online && online.devices == 1);
    let silent_since = Instant::now();
    let offline = wait_for(&mut bob, Duration::from_secs(5), presence_of("alice"))
        .await
        .expect("offline push");
    let after = silent_since.elapsed();
    assert!(!offline.online);
    assert!(offline.last_seen_ms > 0);
    assert!(after >= Duration::from_millis(800), "not before the read deadline: {after:?}");
    drop(alice);
}

#[tokio::test]
async fn given_quick_reconnect_within_grace_should_not_flap() {
    let broker = Broker::start_with(Options::with_args(&["--set", "presence.grace_ms=2000"]));
    let (mut bob, _) = broker.raw_as("bob").await;
    bob.create_direct("alice").await;
    let (alice, _) = broker.raw_as("alice").await;
    assert!(
        wait_for(&mut bob, Duration::from_secs(2), presence_of("alice"))
            .await
            .is_some_and(|p| p.online)
    );
    drop(alice);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_alice_again, _) = broker.raw_as("alice").await;
    // Neither an offline nor a second online push within and after the grace period.
    assert!(wait_for(&mut bob, Duration::from_millis(2_800), presence_of("alice")).await.is_none());
    assert!(query(&mut bob, &["alice"]).await[0].online);
}

#[tokio::test]
async fn given_two_devices_should_stay_online_until_the_last_one_leaves() {
    // A long read deadline, so only the explicit closes below end sessions.
    let broker = Broker::start_with(Options::with_args(&["--set", "presence.grace_ms=300"]));
    let (mut carol, _) = broker.raw_as("carol").await;
    let (phone, _) = broker.raw_as("dave").await;
    let (laptop, _) = broker.raw_as("dave").await;
    let p = &query(&mut carol, &["dave"]).await[0];
    assert!(p.online && p.devices == 2, "{p:?}");
    drop(phone);
    keep_alive(&mut carol, Duration::from_millis(600)).await;
    let p = &query(&mut carol, &["dave"]).await[0];
    assert!(p.online && p.devices == 1, "{p:?}");
    drop(laptop);
    keep_alive(&mut carol, Duration::from_millis(800)).await;
    let p = &query(&mut carol, &["dave", "nobody"]).await;
    assert!(!p[0].online && p[0].last_seen_ms > 0, "{p:?}");
    assert!(!p[1].online && p[1].last_seen_ms == 0, "never seen");
}

#[tokio::test]
async fn given_subscription_should_push_changes_of_users_without_a_direct_conversation() {
    let broker = Broker::start_with(Options::with_args(FAST));
    let (mut carol, _) = broker.raw_as("carol").await;
    let req = client_frame::Kind::PresenceSubscribe(switchboard_protocol::PresenceSubscribe {
        users: vec!["erin".into()],
    });
    match carol.request(req).await {
        server_frame::Kind::Presences(l) => assert!(!l.presences[0].online),
        other => panic!("{other:?}"),
    }
    let (erin, _) = broker.raw_as("erin").await;
    assert!(
        wait_for(&mut carol, Duration::from_secs(2), presence_of("erin"))
            .await
            .is_some_and(|p| p.online)
    );
    drop(erin);
    assert!(
        wait_for(&mut carol, Duration::from_secs(3), presence_of("erin"))
            .await
            .is_some_and(|p| !p.online)
    );
    // Queries are capped.
    let many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
    match carol
        .request(client_frame::Kind::PresenceQuery(switchboard_protocol::PresenceQuery {
            users: many,
        }))
        .await
    {
        server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::LimitExceeded as i32),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_last_seen_should_survive_a_restart() {
    let mut broker = Broker::start_with(Options::with_args(FAST));
    let (frank, _) = broker.raw_as("frank").await;
    let left_at = switchboard_broker::shard::owner::now_ms();
    drop(frank);
    tokio::time::sleep(Duration::from_millis(800)).await; // grace, then a batched write
    assert!(broker.terminate().success());
    broker.restart();
    let (mut gina, _) = broker.raw_as("gina").await;
    let p = &query(&mut gina, &["frank"]).await[0];
    assert!(!p.online);
    assert!(
        p.last_seen_ms.abs_diff(left_at) < 2_000,
        "last seen {} vs left {left_at}",
        p.last_seen_ms
    );
}
