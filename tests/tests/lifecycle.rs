//! Start-up, graceful shutdown, and slow consumers.

use std::time::{Duration, Instant};

use switchboard_client::{Content, HistoryAnchor};
use switchboard_protocol::{
    ClientFrame, Cursor, DisconnectReason, SyncPosition, client_frame, server_frame,
};
use switchboard_tests::{Broker, Options};

#[tokio::test]
async fn given_sigterm_should_tell_clients_to_reconnect_flush_and_exit_zero_promptly() {
    let mut broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let conv = alice.create_direct("bob").await.expect("create").conversation_id;
    for i in 0..50 {
        alice.send(&conv, Content::text(format!("{i}"))).await.expect("send");
    }
    let (mut watcher, _) = broker.raw_as("bob").await;
    let started = Instant::now();
    let status = broker.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let frames = watcher.until_closed().await;
    match frames.last().and_then(|f| f.kind.as_ref()) {
        Some(server_frame::Kind::Disconnect(d)) => {
            assert_eq!(d.reason, DisconnectReason::Shutdown as i32);
            assert!(d.retry_after_ms > 0);
        }
        other => panic!("expected Disconnect, got {other:?}"),
    }
    // Even in buffered mode, a graceful stop flushes and fsyncs everything acknowledged.
    broker.restart();
    let (alice, _) = broker.client("alice").await;
    let page = alice.history(&conv, HistoryAnchor::Latest, 100).await.expect("history");
    assert_eq!(page.last_seq, 51);
}

#[tokio::test]
async fn given_consumer_that_stops_reading_should_be_cut_off_and_lose_nothing_after_resync() {
    let broker = Broker::start_with(Options::with_args(&["--outbound-queue-bytes", "1048576"]));
    let (alice, _) = broker.client("alice").await;
    let conv = alice.create_direct("slow").await.expect("create").conversation_id;
    let (mut slow, _) = broker.raw_as("slow").await;

    // 8 MiB toward a reader that reads nothing: more than the socket buffers and the queue.
    let body = "s".repeat(60_000);
    let total = 140u64;
    for i in 0..total {
        alice
            .send(&conv, Content::text(format!("{i} {body}")))
            .await
            .expect("the sender is not slowed down");
    }
    let frames = slow.until_closed().await;
    let Some(server_frame::Kind::Disconnect(d)) = frames.last().and_then(|f| f.kind.clone()) else {
        panic!("expected a Disconnect last");
    };
    assert_eq!(d.reason, DisconnectReason::SlowConsumer as i32);
    let received: Vec<u64> = frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(server_frame::Kind::Message(m)) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert!((received.len() as u64) < total, "it was cut off before the end");
    switchboard_tests::assert_gapless(received.iter().copied(), 2);
    let cursor = received.last().copied().unwrap_or(1);

    // Reconnect and sync from the cursor: the rest arrives, nothing twice.
    let (mut again, _) = broker.raw_as("slow").await;
    let mut position = SyncPosition {
        feed_position: 1,
        cursors: vec![Cursor { conversation_id: conv.clone(), seq: cursor }],
    };
    let mut rest = Vec::new();
    let mut continuation = bytes::Bytes::new();
    loop {
        let id = again.next_id();
        again
            .send(ClientFrame::request(
                id,
                client_frame::Kind::Sync(switchboard_protocol::Sync {
                    position: Some(position.clone()),
                    limit: 0,
                    continuation,
                }),
            ))
            .await;
        let server_frame::Kind::Sync(page) = again.reply_to(id).await else { panic!("sync") };
        rest.extend(page.messages.iter().map(|m| m.seq));
        if let Some(last) = rest.last() {
            position.cursors[0].seq = *last;
        }
        if !page.has_more {
            break;
        }
        continuation = page.continuation;
    }
    switchboard_tests::assert_gapless(rest.iter().copied(), cursor + 1);
    assert_eq!(rest.last().copied(), Some(total + 1));
}

#[tokio::test]
async fn given_port_zero_should_print_a_ready_line_with_the_bound_address() {
    let broker = Broker::start();
    assert_ne!(broker.addr.port(), 0);
    let (mut c, welcome) = broker.raw_as("alice").await;
    assert_eq!(welcome.user_id, "alice");
    assert_eq!(welcome.protocol_version, 1);
    assert!(welcome.capabilities.iter().any(|c| c == "sync"));
    let limits = welcome.limits.expect("limits");
    assert_eq!((limits.max_frame_bytes, limits.max_body_bytes), (1 << 20, 64 << 10));
    let pong = c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(p) if p.server_time_ms > 0));
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0)
}

#[tokio::test]
async fn given_clients_that_disconnect_should_release_their_sockets() {
    let broker = Broker::start();
    let pid = broker.pid().expect("pid");
    // Warm up (blocking-pool threads, listener state), then measure.
    drop(broker.raw_as("warmup").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = open_fds(pid);
    for round in 0..5 {
        let mut conns = Vec::new();
        for i in 0..20 {
            conns.push(broker.raw_as(&format!("u{round}-{i}")).await.0);
        }
        drop(conns);
    }
    // Promptly: well before the 5 s a stuck writer would be given.
    let mut after = usize::MAX;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = open_fds(pid);
        if after <= before + 2 {
            break;
        }
    }
    assert!(after <= before + 2, "fds before {before}, after 100 closed connections {after}");
}
