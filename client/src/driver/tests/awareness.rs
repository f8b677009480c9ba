//! Receipts, typing, presence and rate-limited sends against a scripted broker.

use super::*;
use pb::{Presence, Receipt, TypingEvent};

/// Connects `builder` through `peer` answering with `welcome`; returns after `Connected`.
async fn connect_with(
    builder: ClientBuilder,
    peer: &mut Peer,
    welcome: pb::Welcome,
) -> (Client, EventStream) {
    let (res, _) = tokio::join!(builder.connect(), peer.accept_with(welcome));
    let (client, mut events) = res.unwrap();
    assert!(matches!(events.next().await, Some(Event::Connected { .. })));
    (client, events)
}

/// A Welcome announcing `max_presence_users`.
fn welcome_presence(max_presence_users: u32) -> pb::Welcome {
    let mut w = welcome(0, SyncPage::default());
    if let Some(limits) = w.limits.as_mut() {
        limits.max_presence_users = max_presence_users;
    }
    w
}

/// Fails if the client writes anything but pings within `how_long`.
async fn expect_quiet(peer: &mut Peer, how_long: Duration) {
    if let Ok(frame) = timeout(how_long, peer.recv()).await {
        panic!("expected no frame, got {frame:?}");
    }
}

fn delivered_of(frame: &ClientFrame) -> (&str, u64) {
    match &frame.kind {
        Some(client_frame::Kind::MarkDelivered(m)) => (m.conversation_id.as_str(), m.seq),
        other => panic!("expected MarkDelivered, got {other:?}"),
    }
}

fn users_of(frame: &ClientFrame) -> Vec<&str> {
    let users = match &frame.kind {
        Some(client_frame::Kind::PresenceQuery(q)) => &q.users,
        Some(client_frame::Kind::PresenceSubscribe(s)) => &s.users,
        Some(client_frame::Kind::PresenceUnsubscribe(u)) => &u.users,
        other => panic!("expected a presence request, got {other:?}"),
    };
    users.iter().map(String::as_str).collect()
}

fn receipt(conv: &str, user: &str, delivered_seq: u64, read_seq: u64) -> Receipt {
    Receipt { conversation_id: conv.into(), user_id: user.into(), delivered_seq, read_seq }
}

fn online(user: &str) -> Presence {
    Presence { user_id: user.into(), online: true, devices: 1, last_seen_ms: 1_000 }
}

fn presences(users: &[&str]) -> server_frame::Kind {
    server_frame::Kind::Presences(pb::PresenceList {
        presences: users.iter().map(|u| online(u)).collect(),
    })
}

fn ack() -> server_frame::Kind {
    server_frame::Kind::Ack(pb::Ack {})
}

fn rate_limited(retry_after_ms: u64) -> server_frame::Kind {
    server_frame::Kind::Error(pb::Error {
        code: ErrorCode::RateLimited as i32,
        message: "slow down".into(),
        retry_after_ms,
        leader_hint: String::new(),
        reason: String::new(),
    })
}

fn typing(user: &str, active: bool) -> TypingEvent {
    TypingEvent { conversation_id: "c".into(), user_id: user.into(), active, expires_in_ms: 6_000 }
}

#[tokio::test(start_paused = true)]
async fn given_mark_read_should_send_conversation_and_seq_and_return_the_receipt() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let call = tokio::spawn(async move { c.mark_read("c", 7).await });
    let frame = peer.recv().await;
    let Some(client_frame::Kind::MarkRead(m)) = &frame.kind else { panic!("{frame:?}") };
    assert_eq!((m.conversation_id.as_str(), m.seq), ("c", 7));
    let mine = receipt("c", "alice", 9, 7);
    peer.reply(frame.request_id, server_frame::Kind::Receipt(mine.clone())).await;
    assert_eq!(call.await.unwrap().unwrap(), mine);

    let c = client.clone();
    let call = tokio::spawn(async move { c.mark_read("x", 1).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, ServerFrame::error(0, ErrorCode::NotFound, "no").kind.unwrap())
        .await;
    assert_eq!(call.await.unwrap().unwrap_err().code(), Some(ErrorCode::NotFound));
}

#[tokio::test(start_paused = true)]
async fn given_typing_should_send_it_once_and_return_a_rate_limit_without_retrying() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let call = tokio::spawn(async move { c.typing("c", true).await });
    let frame = peer.recv().await;
    let Some(client_frame::Kind::Typing(t)) = &frame.kind else { panic!("{frame:?}") };
    assert_eq!((t.conversation_id.as_str(), t.active), ("c", true));
    peer.reply(frame.request_id, ack()).await;
    call.await.unwrap().unwrap();

    let c = client.clone();
    let call = tokio::spawn(async move { c.typing("c", false).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, rate_limited(100)).await;
    assert_eq!(call.await.unwrap().unwrap_err().code(), Some(ErrorCode::RateLimited));
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn given_more_users_than_the_broker_limit_when_querying_presence_should_split_and_join() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect_with(net.builder(), &mut peer, welcome_presence(2)).await;

    let c = client.clone();
    let call = tokio::spawn(async move { c.presence(["a", "b", "c", "d", "e"]).await });
    let frames = [peer.recv().await, peer.recv().await, peer.recv().await];
    let chunks: Vec<Vec<&str>> = frames.iter().map(users_of).collect();
    assert_eq!(chunks, vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]);
    assert!(matches!(frames[0].kind, Some(client_frame::Kind::PresenceQuery(_))));
    // Answered out of order, joined in the order asked.
    peer.reply(frames[2].request_id, presences(&["e"])).await;
    peer.reply(frames[0].request_id, presences(&["a", "b"])).await;
    peer.reply(frames[1].request_id, presences(&["c", "d"])).await;

    let users: Vec<String> = call.await.unwrap().unwrap().into_iter().map(|p| p.user_id).collect();
    assert_eq!(users, ["a", "b", "c", "d", "e"]);
    assert_eq!(client.presence(Vec::<String>::new()).await.unwrap(), vec![], "no request");
}

#[tokio::test(start_paused = true)]
async fn given_subscribe_and_unsubscribe_should_send_the_users_and_map_the_replies() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let call = tokio::spawn(async move { c.subscribe_presence(["bob", "carol"]).await });
    let frame = peer.recv().await;
    assert!(matches!(frame.kind, Some(client_frame::Kind::PresenceSubscribe(_))));
    assert_eq!(users_of(&frame), ["bob", "carol"]);
    peer.reply(frame.request_id, presences(&["bob", "carol"])).await;
    assert_eq!(call.await.unwrap().unwrap(), vec![online("bob"), online("carol")]);

    let c = client.clone();
    let call = tokio::spawn(async move { c.unsubscribe_presence(["bob"]).await });
    let frame = peer.recv().await;
    assert!(matches!(frame.kind, Some(client_frame::Kind::PresenceUnsubscribe(_))));
    assert_eq!(users_of(&frame), ["bob"]);
    peer.reply(frame.request_id, ack()).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn given_receipts_request_should_send_paging_arguments_and_return_the_list() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let call = tokio::spawn(async move { c.receipts("g", Some("bob"), 50).await });
    let frame = peer.recv().await;
    let Some(client_frame::Kind::GetReceipts(g)) = &frame.kind else { panic!("{frame:?}") };
    assert_eq!((g.conversation_id.as_str(), g.after.as_str(), g.limit), ("g", "bob", 50));
    let list = pb::ReceiptList {
        conversation_id: "g".into(),
        receipts: vec![receipt("g", "carol", 4, 3)],
        has_more: true,
        next_after: "carol".into(),
    };
    peer.reply(frame.request_id, server_frame::Kind::Receipts(list.clone())).await;
    assert_eq!(call.await.unwrap().unwrap(), list);
}

#[tokio::test(start_paused = true)]
async fn given_pushes_should_emit_presence_receipts_and_only_other_users_typing() {
    let net = Net::new();
    let mut peer = net.offer();
    let (_client, mut events) = connect(net.builder(), &mut peer, 0).await;

    peer.push(server_frame::Kind::Typing(typing("alice", true))).await;
    peer.push(server_frame::Kind::Typing(typing("bob", true))).await;
    peer.push(server_frame::Kind::Presence(online("bob"))).await;
    peer.push(server_frame::Kind::ReceiptEvent(receipt("c", "bob", 3, 2))).await;

    assert_eq!(events.next().await, Some(Event::Typing(typing("bob", true))), "alice is me");
    assert_eq!(events.next().await, Some(Event::Presence(online("bob"))));
    assert_eq!(events.next().await, Some(Event::Receipt(receipt("c", "bob", 3, 2))));
}

#[tokio::test(start_paused = true)]
async fn given_messages_within_the_window_should_coalesce_mark_delivered_to_the_latest_seq() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.default_builder().resume_from(position(&[("c", 0)]));
    let (_client, mut events) = connect(builder, &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 1, "bob", "b1"))).await;
    let first = peer.recv().await;
    let start = Instant::now();
    assert_eq!(delivered_of(&first), ("c", 1), "the first one at once");
    peer.reply(first.request_id, server_frame::Kind::Receipt(receipt("c", "alice", 1, 0))).await;
    for seq in 2..=4 {
        peer.push(server_frame::Kind::Message(message("c", seq, "bob", "b"))).await;
    }
    expect_quiet(&mut peer, Duration::from_millis(400)).await;

    let second = peer.recv().await;
    assert_eq!(delivered_of(&second), ("c", 4), "one receipt with the latest seq");
    assert!(start.elapsed() >= Duration::from_millis(500), "after {:?}", start.elapsed());
    peer.reply(second.request_id, server_frame::Kind::Receipt(receipt("c", "alice", 4, 0))).await;
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
    for seq in 1..=4 {
        assert_eq!(message_seq(events.next().await), seq);
    }
}

#[tokio::test(start_paused = true)]
async fn given_seqs_already_acknowledged_should_not_send_mark_delivered_for_them() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.default_builder().resume_from(position(&[("c", 0)]));
    let (_client, mut events) = connect(builder, &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 1, "bob", "b1"))).await;
    let first = peer.recv().await;
    assert_eq!(delivered_of(&first), ("c", 1));
    // Another device of the user got further.
    peer.reply(first.request_id, server_frame::Kind::Receipt(receipt("c", "alice", 3, 0))).await;
    for seq in 2..=3 {
        peer.push(server_frame::Kind::Message(message("c", seq, "bob", "b"))).await;
    }
    expect_quiet(&mut peer, Duration::from_secs(2)).await;

    // And reports more, in a receipt push.
    peer.push(server_frame::Kind::ReceiptEvent(receipt("c", "alice", 5, 5))).await;
    for seq in 4..=5 {
        peer.push(server_frame::Kind::Message(message("c", seq, "bob", "b"))).await;
    }
    expect_quiet(&mut peer, Duration::from_secs(2)).await;

    peer.push(server_frame::Kind::Message(message("c", 6, "bob", "b6"))).await;
    assert_eq!(delivered_of(&peer.recv().await), ("c", 6));
    for seq in 1..=3 {
        assert_eq!(message_seq(events.next().await), seq);
    }
    let own = receipt("c", "alice", 5, 5);
    assert_eq!(events.next().await, Some(Event::Receipt(own)), "own receipts are emitted");
}

#[tokio::test(start_paused = true)]
async fn given_unconfirmed_delivery_when_reconnected_should_send_the_latest_after_resuming() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.default_builder().resume_from(position(&[("c", 0)]));
    let (_client, mut events) = connect(builder, &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 1, "bob", "b1"))).await;
    assert_eq!(delivered_of(&peer.recv().await), ("c", 1));
    peer.push(server_frame::Kind::Message(message("c", 2, "bob", "b2"))).await;
    assert_eq!(message_seq(events.next().await), 1);
    assert_eq!(message_seq(events.next().await), 2);
    drop(peer); // Neither receipt is confirmed; the second was still in its window.
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));

    let mut peer = net.offer();
    let resumed = SyncPage {
        messages: vec![message("c", 3, "bob", "b3")],
        has_more: true,
        continuation: Bytes::from_static(b"more"),
        ..SyncPage::default()
    };
    peer.accept(0, resumed).await;
    let sync = peer.recv().await;
    sync_of(&sync);
    let rest = SyncPage { messages: vec![message("c", 4, "bob", "b4")], ..SyncPage::default() };
    peer.reply(sync.request_id, server_frame::Kind::Sync(rest)).await;

    let frame = peer.recv().await;
    assert_eq!(delivered_of(&frame), ("c", 4), "after the resume sync, the latest only");
    peer.reply(frame.request_id, server_frame::Kind::Receipt(receipt("c", "alice", 4, 0))).await;
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn given_receipts_disabled_should_never_send_mark_delivered() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.default_builder().auto_delivery_receipts(false);
    let (_client, mut events) =
        connect(builder.resume_from(position(&[("c", 0)])), &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 1, "bob", "b1"))).await;
    assert_eq!(message_seq(events.next().await), 1);
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn given_broker_without_receipts_should_stop_sending_them_on_that_connection() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.default_builder().resume_from(position(&[("c", 0), ("d", 0)]));
    let (_client, _events) = connect(builder, &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 1, "bob", "b1"))).await;
    let frame = peer.recv().await;
    let unsupported = ServerFrame::error(0, ErrorCode::Unsupported, "unknown frame type");
    peer.reply(frame.request_id, unsupported.kind.unwrap()).await;
    peer.push(server_frame::Kind::Message(message("d", 1, "bob", "b1"))).await;
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn given_presence_subscriptions_when_reconnected_should_renew_them_after_resuming() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let subscribe = tokio::spawn(async move { c.subscribe_presence(["bob", "carol"]).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, presences(&["bob", "carol"])).await;
    subscribe.await.unwrap().unwrap();
    let c = client.clone();
    let subscribe = tokio::spawn(async move { c.subscribe_presence(["dave"]).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, presences(&["dave"])).await;
    subscribe.await.unwrap().unwrap();
    let c = client.clone();
    let unsubscribe = tokio::spawn(async move { c.unsubscribe_presence(["carol"]).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, ack()).await;
    unsubscribe.await.unwrap().unwrap();
    drop(peer);
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));

    let mut peer = net.offer();
    let mut welcome = welcome_presence(1);
    welcome.resumed = Some(SyncPage {
        has_more: true,
        continuation: Bytes::from_static(b"more"),
        ..SyncPage::default()
    });
    peer.accept_with(welcome).await;
    let sync = peer.recv().await;
    sync_of(&sync);
    peer.reply(sync.request_id, server_frame::Kind::Sync(SyncPage::default())).await;

    let first = peer.recv().await;
    let second = peer.recv().await;
    assert!(matches!(first.kind, Some(client_frame::Kind::PresenceSubscribe(_))));
    assert_eq!((users_of(&first), users_of(&second)), (vec!["bob"], vec!["dave"]), "chunked");
    peer.reply(first.request_id, presences(&["bob"])).await;
    peer.reply(second.request_id, presences(&["dave"])).await;

    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: true, .. })));
    assert_eq!(events.next().await, Some(Event::Presence(online("bob"))));
    assert_eq!(events.next().await, Some(Event::Presence(online("dave"))));
}

#[tokio::test(start_paused = true)]
async fn given_unsubscribe_while_disconnected_should_succeed_and_not_renew_the_user() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;

    let c = client.clone();
    let subscribe = tokio::spawn(async move { c.subscribe_presence(["bob", "carol"]).await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, presences(&["bob", "carol"])).await;
    subscribe.await.unwrap().unwrap();
    drop(peer);
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    client.unsubscribe_presence(["bob"]).await.unwrap();

    let mut peer = net.offer();
    peer.accept(0, SyncPage::default()).await;
    let frame = peer.recv().await;
    assert_eq!(users_of(&frame), ["carol"]);
}

#[tokio::test(start_paused = true)]
async fn given_rate_limited_send_should_retry_after_the_wait_with_the_same_key() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) =
        connect(net.builder().resume_from(position(&[("c", 4)])), &mut peer, 0).await;

    let c = client.clone();
    let send = tokio::spawn(async move { c.send("c", Content::text("hi")).await });
    let first = peer.recv().await;
    let key = send_of(&first).client_msg_id.clone();
    let start = Instant::now();
    peer.reply(first.request_id, rate_limited(300)).await;

    let again = peer.recv().await;
    assert!(start.elapsed() >= Duration::from_millis(300), "after {:?}", start.elapsed());
    assert_eq!(send_of(&again).client_msg_id, key, "same idempotency key");
    assert_eq!(send_of(&again).content, send_of(&first).content);
    let ack = pb::SendAck {
        conversation_id: "c".into(),
        seq: 5,
        client_msg_id: key,
        ..Default::default()
    };
    peer.reply(again.request_id, server_frame::Kind::SendAck(ack)).await;
    assert_eq!(send.await.unwrap().unwrap().seq, 5);
}

#[tokio::test(start_paused = true)]
async fn given_rate_limit_retries_used_up_should_return_the_error() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder().send_rate_limit_retries(1), &mut peer, 0).await;

    let c = client.clone();
    let send = tokio::spawn(async move { c.send("c", Content::text("hi")).await });
    let first = peer.recv().await;
    let start = Instant::now();
    peer.reply(first.request_id, rate_limited(0)).await;
    let again = peer.recv().await;
    assert!(start.elapsed() >= Duration::from_millis(50), "at least 50 ms");
    peer.reply(again.request_id, rate_limited(0)).await;

    let err = send.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Server { code: ErrorCode::RateLimited, retry_after_ms: 0, .. }),
        "{err:?}"
    );
    expect_quiet(&mut peer, Duration::from_secs(2)).await;
}
