//! Operations: the Prometheus metrics, the admin API, connection caps, the disk-space floor
//! and handshake-timeout protection, each against a real broker over real sockets.

use std::net::SocketAddr;
use std::time::Duration;

use switchboard_client::{Content, HistoryVisibility};
use switchboard_protocol::{DisconnectReason, ErrorCode, ServerFrame, client_frame, server_frame};
use switchboard_tests::{
    Broker, Options, RawConn, WsConn, WsProto, eventually, hello, http_get, http_request_with,
    messages, text,
};

const ADMIN_TOKEN: &str = "an-admin-token-of-32-characters!";

fn admin_broker(extra: &[&str]) -> Broker {
    let mut opts = Options::with_args(&["--set", &format!("http.admin_token={ADMIN_TOKEN}")]);
    opts.args.extend(extra.iter().map(ToString::to_string));
    Broker::start_with(opts)
}

async fn admin(
    http: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("Authorization", b.as_str())).collect();
    let (status, body) = http_request_with(http, method, path, &headers, "").await;
    (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

/// The value of the first sample of `metric` whose labels contain every one of `labels`.
fn sample(body: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (name, rest) = series.split_once('{').unwrap_or((series, ""));
        (name == metric && labels.iter().all(|want| rest.contains(want)))
            .then(|| value.parse().ok())?
    })
}

fn disconnect_reason(frames: &[ServerFrame]) -> Option<i32> {
    frames.iter().find_map(|f| match &f.kind {
        Some(server_frame::Kind::Disconnect(d)) => Some(d.reason),
        _ => None,
    })
}

fn error_code(kind: &server_frame::Kind) -> Option<i32> {
    match kind {
        server_frame::Kind::Error(e) => Some(e.code),
        _ => None,
    }
}

fn send(conv: &str, key: &str) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(key)),
    })
}

#[tokio::test]
async fn given_traffic_over_tcp_and_websocket_should_expose_every_operational_metric() {
    let broker = Broker::start_with(Options {
        durability: "sync".into(),
        args: ["--set", "limits.send_burst=5", "--set", "limits.send_rate_per_sec=1"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    });
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    let mut bob = WsConn::connect(broker.http, WsProto::Json, None).await.expect("ws");
    bob.request(hello(&broker.token("bob"))).await;
    // Sends until one is over the rate (the burst of five, plus what refilled meanwhile: one
    // per second).
    let mut acked: u32 = 0;
    loop {
        match alice.request(send(&conv, &format!("m{acked}"))).await {
            server_frame::Kind::SendAck(_) => acked += 1,
            other => {
                assert_eq!(error_code(&other), Some(ErrorCode::RateLimited as i32));
                break;
            }
        }
        assert!(acked < 50, "never rate limited");
    }
    assert!(acked >= 5, "the burst was allowed: {acked}");
    assert_eq!(text(&bob.next_message().await), Some("m0"));

    // Counters reach the registry on each shard's next flush tick (every second), gauges of
    // the store every second or five: wait until every series is there.
    let sends = f64::from(acked + 1);
    let body = until("metrics after the traffic", || async {
        let (_, body) = http_get(broker.http, "/metrics").await;
        let ready = sample(&body, "switchboard_frames_in_total", &["tcp", "type=\"send\""])
            .is_some_and(|n| n >= sends)
            && sample(&body, "switchboard_messages_stored_total", &[])
                .is_some_and(|n| n >= f64::from(acked))
            && [
                ("switchboard_frames_out_total", &["ws", "type=\"message\""][..]),
                ("switchboard_frames_out_total", &["tcp", "type=\"send_ack\""][..]),
                ("switchboard_bytes_in_total", &["ws", "type=\"hello\""][..]),
                ("switchboard_mailbox_depth", &["shard=\"0\""][..]),
                ("switchboard_mailbox_depth", &["shard=\"2\""][..]),
                ("switchboard_storage_free_bytes", &[][..]),
            ]
            .iter()
            .all(|(m, l)| sample(&body, m, l).is_some());
        ready.then_some(body)
    })
    .await;
    let has = |metric: &str, labels: &[&str]| {
        sample(&body, metric, labels).unwrap_or_else(|| panic!("{metric} {labels:?} in\n{body}"))
    };
    assert_eq!(has("switchboard_sessions", &[]), 2.0);
    assert_eq!(has("switchboard_online_users", &[]), 2.0);
    assert_eq!(has("switchboard_connections", &["transport=\"tcp\""]), 1.0);
    assert_eq!(has("switchboard_connections", &["transport=\"ws\""]), 1.0);
    assert!(has("switchboard_bytes_in_total", &["tcp", "type=\"send\""]) > sends * 10.0);
    assert!(has("switchboard_bytes_in_total", &["ws", "type=\"hello\""]) > 0.0);
    assert!(has("switchboard_frames_out_total", &["tcp", "type=\"send_ack\""]) >= f64::from(acked));
    assert!(has("switchboard_bytes_out_total", &["ws", "type=\"message\""]) > 0.0);
    assert_eq!(has("switchboard_rate_limited_total", &["limit=\"send\""]), 1.0);
    assert!(has("switchboard_send_ack_seconds_count", &[]) >= f64::from(acked));
    assert!(has("switchboard_storage_fsync_seconds_count", &[]) >= 1.0, "sync mode fsyncs");
    assert!(has("switchboard_storage_batch_ops_count", &[]) >= 1.0);
    assert!(has("switchboard_storage_batch_ops_bucket", &["le=\"1\""]) >= 0.0);
    assert!(has("switchboard_mailbox_depth", &["shard=\"0\""]) >= 0.0);
    assert!(has("switchboard_storage_free_bytes", &[]) > 0.0);
    let stored = until("the store's size (every 5 s)", || async {
        let (_, body) = http_get(broker.http, "/metrics").await;
        sample(&body, "switchboard_storage_bytes", &[]).filter(|b| *b > 0.0)
    })
    .await;
    assert!(stored > 0.0);

    // A session closing takes its gauges down with it.
    drop(bob);
    until("the websocket session gone from the gauges", || async {
        let (_, body) = http_get(broker.http, "/metrics").await;
        (sample(&body, "switchboard_sessions", &[]) == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn given_an_admin_token_should_list_and_disconnect_a_users_sessions_and_report_stats() {
    let broker = admin_broker(&[]);
    let http = broker.http;
    // Off without the token, 401 with a wrong one.
    let (status, _) = admin(http, "GET", "/admin/stats", None).await;
    assert_eq!(status, 401);
    let (status, _) = admin(http, "GET", "/admin/stats", Some("not-the-token-at-all")).await;
    assert_eq!(status, 401);
    let plain = Broker::start();
    let (status, _) = admin(plain.http, "GET", "/admin/stats", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404, "the admin API is off without http.admin_token");

    let (mut phone, _) = broker.raw_as("carol").await;
    let mut laptop = WsConn::connect(http, WsProto::Binary, None).await.expect("ws");
    laptop.request(hello(&broker.token("carol"))).await;
    let (mut other, _) = broker.raw_as("dave").await;

    let (status, body) = admin(http, "GET", "/admin/users/carol/sessions", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let sessions = body["sessions"].as_array().expect("sessions").clone();
    assert_eq!(sessions.len(), 2, "{body}");
    // Path segments are percent-decoded (as a URL builder writes `@` or `:`).
    let (_, encoded) = admin(http, "GET", "/admin/users/car%6Fl/sessions", Some(ADMIN_TOKEN)).await;
    assert_eq!(encoded["sessions"].as_array().map(Vec::len), Some(2), "{encoded}");
    // A query value that does not decode is refused, not dropped (which would widen this
    // disconnect to every session of the user).
    let (status, _) =
        admin(http, "POST", "/admin/users/carol/disconnect?session=%FF", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400);
    let mut transports: Vec<&str> =
        sessions.iter().filter_map(|s| s["transport"].as_str()).collect();
    transports.sort_unstable();
    assert_eq!(transports, ["tcp", "ws"]);
    assert!(sessions.iter().all(|s| s["user"] == "carol" && s["client"] == "switchboard-tests"));
    assert!(sessions.iter().all(|s| s["address"].as_str().is_some_and(|a| a.starts_with("127."))));

    let (status, stats) = admin(http, "GET", "/admin/stats", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["sessions"], 3, "{stats}");
    assert_eq!(stats["online_users"], 2, "{stats}");
    assert_eq!(stats["shards"].as_array().map(Vec::len), Some(3), "{stats}");
    assert_eq!(stats["storage"]["full"], false);
    assert!(stats["storage"]["free_bytes"].as_u64().is_some_and(|f| f > 0), "{stats}");

    // One session by id: only that one is closed, with its reason.
    let tcp = sessions.iter().find(|s| s["transport"] == "tcp").expect("tcp session");
    let path = format!(
        "/admin/users/carol/disconnect?session={}",
        tcp["session"].as_str().expect("session id")
    );
    let (status, body) = admin(http, "POST", &path, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["disconnected"]), (200, &serde_json::json!(1)), "{body}");
    let frames = phone.until_closed().await;
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ClosedByAdmin as i32));
    let pong = laptop.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)), "the other session stays");

    // All of a user's sessions; other users untouched.
    let (status, body) =
        admin(http, "POST", "/admin/users/carol/disconnect", Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["disconnected"]), (200, &serde_json::json!(1)), "{body}");
    let frames = laptop.until_closed().await;
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ClosedByAdmin as i32));
    let pong = other.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
    let (_, body) = admin(http, "GET", "/admin/users/carol/sessions", Some(ADMIN_TOKEN)).await;
    assert_eq!(body["sessions"], serde_json::json!([]), "{body}");
    let (status, _) = admin(http, "GET", "/admin/users/bad:user/sessions", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn given_a_group_when_an_operator_removes_a_member_should_stop_their_deliveries_at_once() {
    let broker = admin_broker(&[]);
    let http = broker.http;
    let (owner, mut owner_events) = broker.client("erin").await;
    let (_member, mut member_events) = broker.client("frank").await;
    let (mut frank_raw, _) = broker.raw_as("frank").await;
    let group = owner
        .create_group("ops", vec!["frank"], HistoryVisibility::Shared)
        .await
        .expect("group")
        .conversation_id;
    owner.send(&group, Content::text("before")).await.expect("send");
    assert_eq!(messages(&mut member_events, &group, 2).await.len(), 2);

    let encoded = group.replace(':', "%3A");
    let (status, stats) =
        admin(http, "GET", &format!("/admin/conversations/{encoded}"), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["kind"], "group");
    assert_eq!(stats["members"], 2);
    assert_eq!(stats["head_seq"], 2, "{stats}");
    assert_eq!(stats["messages"], 1, "{stats}");
    assert_eq!(stats["created_by"], "erin");
    let (status, _) =
        admin(http, "GET", "/admin/conversations/no-such-room", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404);

    let path = format!("/admin/conversations/{group}/members/frank/remove");
    let (status, body) = admin(http, "POST", &path, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["removed"], serde_json::json!(["frank"]));
    assert_eq!(body["seq"], 3);
    // Removing again changes nothing; a direct conversation's members are fixed.
    let (status, body) = admin(http, "POST", &path, Some(ADMIN_TOKEN)).await;
    assert_eq!((status, &body["removed"]), (200, &serde_json::json!([])), "{body}");
    let direct = frank_raw.create_direct("erin").await;
    let (status, _) = admin(
        http,
        "POST",
        &format!("/admin/conversations/{direct}/members/frank/remove"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 409);

    // Frank's next message is the removal entry; the owner's later sends never reach him and
    // he can neither read nor write the group.
    owner.send(&group, Content::text("after")).await.expect("send");
    let seen = messages(&mut owner_events, &group, 4).await;
    assert_eq!(seen.last().and_then(text), Some("after"));
    let removal = messages(&mut member_events, &group, 1).await;
    assert_eq!(removal[0].seq, 3);
    assert!(removal[0].sender.is_empty(), "an operator's removal has no sender");
    let reply = frank_raw.request(send(&group, "still-here")).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::NotFound as i32));
    let history = frank_raw
        .request(client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: group.clone(),
            limit: 10,
            anchor: None,
        }))
        .await;
    assert_eq!(error_code(&history), Some(ErrorCode::NotFound as i32));
    // His other session too: the group's pushes up to the removal entry, then none.
    let mut last = 0;
    while last < 3 {
        let m = frank_raw.next_message().await;
        if m.conversation_id == group {
            last = m.seq;
        }
    }
    assert_eq!(last, 3);
    let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(m) = tokio::time::timeout_at(quiet, frank_raw.next_message()).await {
        assert_ne!(m.conversation_id, group, "a delivery after the removal: {m:?}");
    }
}

#[tokio::test]
async fn given_connection_caps_should_refuse_connections_beyond_them_on_tcp_and_websocket() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "limits.max_connections=4",
        "--set",
        "limits.max_connections_per_ip=2",
    ]));
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let second = std::net::IpAddr::from([127, 0, 0, 2]);
    let third = std::net::IpAddr::from([127, 0, 0, 3]);
    let mut a1 = RawConn::connect_from(broker.addr, local).await;
    let mut a2 = RawConn::connect_from(broker.addr, local).await;
    a1.hello(&broker.token("gina")).await;
    a2.hello(&broker.token("gina")).await;
    // A third connection from the same address: refused with a typed error and a reason.
    let mut refused = RawConn::connect_from(broker.addr, local).await;
    let frames = refused.until_closed().await;
    assert!(
        frames.first().and_then(|f| f.kind.as_ref()).and_then(error_code)
            == Some(ErrorCode::LimitExceeded as i32),
        "{frames:?}"
    );
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ConnectionLimit as i32));
    // WebSocket counts against the same caps.
    let ws = WsConn::connect(broker.http, WsProto::Binary, None).await;
    assert!(ws.is_err(), "the websocket upgrade is refused at the cap");
    // Another address still gets in, up to the total cap.
    let mut b1 = RawConn::connect_from(broker.addr, second).await;
    b1.hello(&broker.token("hank")).await;
    let mut b2 = RawConn::connect_from(broker.addr, second).await;
    b2.hello(&broker.token("hank")).await;
    let mut over_total = RawConn::connect_from(broker.addr, third).await;
    let frames = over_total.until_closed().await;
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ConnectionLimit as i32));
    // A closed connection frees its slot; the sessions in place never noticed.
    drop(a1);
    let gina = broker.token("gina");
    let mut again =
        until("a slot freed by a closed connection", || RawConn::try_connect(broker.addr, &gina))
            .await;
    let pong = again.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
    let pong = b1.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
    // Plain HTTP counts too: this address is at its cap, so even /metrics is refused.
    let (status, _) = http_get(broker.http, "/metrics").await;
    assert_eq!(status, 503, "an HTTP connection beyond the per-address cap");
    drop((again, a2));
    let body = until("/metrics once a slot is free", || async {
        let (status, body) = http_get(broker.http, "/metrics").await;
        (status == 200).then_some(body)
    })
    .await;
    assert!(
        sample(&body, "switchboard_connections_refused_total", &["max_connections_per_ip"])
            .is_some_and(|n| n >= 2.0),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_thousands_of_slowloris_sockets_should_close_them_at_the_handshake_timeout_while_clients_connect()
 {
    const SLOW: usize = 2_000;
    // The test process holds every slow socket: make room for them (the broker raises its own).
    let nofile = rlimit::increase_nofile_limit(8_192).unwrap_or(0);
    assert!(nofile >= 4_096, "this test needs 4096 open files, the limit is {nofile}");
    let broker = Broker::start_with(Options::with_args(&[
        "--hello-timeout-ms",
        "1500",
        "--set",
        "limits.connect_burst_per_ip=5000",
        "--set",
        "limits.connect_rate_per_ip=5000",
    ]));
    let addr = broker.addr;
    // Each slow socket sends one byte of a length prefix every 500 ms, forever.
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return None };
                let started = tokio::time::Instant::now();
                let mut buf = [0u8; 256];
                for _ in 0..40 {
                    if s.write_all(&[0]).await.is_err() {
                        return Some(started.elapsed());
                    }
                    let read = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf));
                    // The broker's error and Disconnect come first, then its close.
                    if let Ok(Ok(0) | Err(_)) = read.await {
                        return Some(started.elapsed());
                    }
                }
                None
            })
        })
        .collect();
    // Meanwhile legitimate clients connect, chat and leave.
    let mut chats = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let (mut c, _) = broker.raw_as(&format!("legit{chats}")).await;
        let conv = c.create_direct("someone").await;
        let reply = c.request(send(&conv, "hi")).await;
        assert!(matches!(reply, server_frame::Kind::SendAck(_)), "{reply:?}");
        chats += 1;
    }
    let mut closed = 0;
    for s in slow {
        if let Ok(Some(after)) = s.await {
            assert!(after < Duration::from_secs(10), "closed by the handshake timeout: {after:?}");
            closed += 1;
        }
    }
    assert_eq!(closed, SLOW, "every slow socket was closed");
    assert!(chats >= 1, "legitimate clients kept connecting: {chats}");
}

#[tokio::test]
async fn given_a_websocket_that_only_pings_before_hello_should_be_closed_at_the_handshake_timeout()
{
    let broker = Broker::start_with(Options::with_args(&["--hello-timeout-ms", "2000"]));
    let mut ws = WsConn::connect(broker.http, WsProto::Binary, None).await.expect("ws");
    let started = tokio::time::Instant::now();
    // Pings are activity only after Hello: before it the deadline stays absolute. Pinging
    // until 1.8 s (stopping before the close, so no ping meets a closed socket), a deadline
    // moved by pings would close at 3.6 s or later instead of 2 s.
    for _ in 0..9 {
        ws.send_raw(tokio_tungstenite::tungstenite::Message::Ping(vec![1].into())).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let frames = ws.until_closed().await;
    let closed_after = started.elapsed();
    assert!(closed_after < Duration::from_millis(3_200), "closed after {closed_after:?}");
    assert_eq!(
        disconnect_reason(&frames),
        Some(DisconnectReason::HelloTimeout as i32),
        "{frames:?}"
    );
}

#[tokio::test]
async fn given_free_space_below_the_floor_should_refuse_writes_as_storage_full_until_space_returns()
{
    // Root can mount a small tmpfs whose free space the test controls.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        eprintln!("skipped: mounting a tmpfs for the disk-space test needs root");
        return;
    }
    let mount = tempfile::tempdir().expect("dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
        .arg(mount.path())
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.path().to_owned());
    let data = mount.path().join("data");
    let broker = Broker::start_with(Options {
        data_dir: Some(data),
        ..Options::with_args(&["--set", "storage.min_free_mb=128"])
    });
    let (mut c, _) = broker.raw_as("ivan").await;
    let conv = c.create_direct("judy").await;
    let reply = c.request(send(&conv, "room-to-spare")).await;
    assert!(matches!(reply, server_frame::Kind::SendAck(_)), "{reply:?}");

    // Fill the file system past the floor.
    let filler = mount.path().join("filler");
    std::fs::write(&filler, vec![0u8; 160 << 20]).expect("fill");
    let refused = send_until(&mut c, &conv, "sends refused below the floor", |r| {
        error_code(r) == Some(ErrorCode::StorageFull as i32)
    })
    .await;
    let server_frame::Kind::Error(refused) = refused else { unreachable!() };
    assert!(refused.retry_after_ms > 0, "{refused:?}");
    let create = c
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            members: vec!["judy".into()],
            name: "full".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(error_code(&create), Some(ErrorCode::StorageFull as i32));
    // Reads still work.
    assert!(!c.log(&conv).await.is_empty());
    let (_, body) = http_get(broker.http, "/metrics").await;
    assert!(sample(&body, "switchboard_storage_free_bytes", &[]).is_some_and(|f| f < 128e6 * 1.05));

    std::fs::remove_file(&filler).expect("free");
    send_until(&mut c, &conv, "sends accepted once space returns", |r| {
        matches!(r, server_frame::Kind::SendAck(_))
    })
    .await;
    assert!(broker.log().contains("disk nearly full"), "the log says why");
}

/// [`eventually`] for probes that answer `None` until they hold.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually(what, || {
        let next = probe();
        async move { next.await.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
}

/// Sends until the reply is what `want` accepts, for at most 10 s.
async fn send_until(
    c: &mut RawConn,
    conv: &str,
    what: &str,
    want: impl Fn(&server_frame::Kind) -> bool,
) -> server_frame::Kind {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = c.request(send(conv, &format!("k{}", rand_suffix()))).await;
        if want(&reply) {
            return reply;
        }
        assert!(tokio::time::Instant::now() < deadline, "waited for {what}; last {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
