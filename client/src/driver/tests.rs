//! Driver tests against a scripted broker over in-memory duplex streams.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use switchboard_protocol::{
    self as pb, ClientFrame, Content, Cursor, DisconnectReason, ErrorCode, Limits, Message,
    ServerCodec, ServerFrame, SyncPage, SyncPosition, client_frame, server_frame,
};
use tokio::io::DuplexStream;
use tokio::sync::{Mutex, mpsc};
use tokio::time::{Instant, timeout};
use tokio_util::codec::Framed;

use crate::{Client, ClientBuilder, Error, Event, EventStream, HistoryAnchor, ReconnectPolicy};

/// Hands out in-memory connections: each `offer` queues one for the client's next attempt.
struct Net {
    tx: mpsc::UnboundedSender<DuplexStream>,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<DuplexStream>>>,
}

impl Net {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self { tx, rx: Arc::new(Mutex::new(rx)) }
    }

    fn offer(&self) -> Peer {
        let (client, server) = tokio::io::duplex(1 << 16);
        self.tx.send(client).unwrap();
        Peer(Framed::new(server, ServerCodec::default()))
    }

    /// A builder without automatic delivery receipts, so that scripts see only the frames
    /// they are about.
    fn builder(&self) -> ClientBuilder {
        self.default_builder().auto_delivery_receipts(false)
    }

    /// A builder with the default options.
    fn default_builder(&self) -> ClientBuilder {
        let rx = Arc::clone(&self.rx);
        Client::builder("unused:0").token("tok").connector(move || {
            let rx = Arc::clone(&rx);
            async move {
                let stream = rx.lock().await.recv().await;
                stream.ok_or_else(|| io::Error::other("no more connections"))
            }
        })
    }
}

/// The broker's end of one connection.
struct Peer(Framed<DuplexStream, ServerCodec>);

impl Peer {
    /// The next frame, whatever it is.
    async fn recv_raw(&mut self) -> ClientFrame {
        self.0.next().await.expect("client closed the connection").unwrap()
    }

    /// The next frame that is not a heartbeat ping (pings are answered).
    async fn recv(&mut self) -> ClientFrame {
        loop {
            let frame = self.recv_raw().await;
            if let Some(client_frame::Kind::Ping(_)) = frame.kind {
                self.reply(frame.request_id, server_frame::Kind::Pong(pb::Pong::default())).await;
                continue;
            }
            return frame;
        }
    }

    async fn reply(&mut self, request_id: u64, kind: server_frame::Kind) {
        self.0.send(ServerFrame::reply(request_id, kind)).await.unwrap();
    }

    async fn push(&mut self, kind: server_frame::Kind) {
        self.reply(0, kind).await;
    }

    /// Reads Hello and answers Welcome; returns the Hello.
    async fn accept(&mut self, max_inflight: u32, resumed: SyncPage) -> (u64, pb::Hello) {
        self.accept_with(welcome(max_inflight, resumed)).await
    }

    /// Reads Hello and answers `welcome`; returns the Hello.
    async fn accept_with(&mut self, welcome: pb::Welcome) -> (u64, pb::Hello) {
        let frame = self.recv().await;
        let Some(client_frame::Kind::Hello(hello)) = frame.kind else {
            panic!("expected Hello, got {frame:?}")
        };
        self.reply(frame.request_id, server_frame::Kind::Welcome(welcome)).await;
        (frame.request_id, hello)
    }
}

fn welcome(max_inflight: u32, resumed: SyncPage) -> pb::Welcome {
    pb::Welcome {
        user_id: "alice".into(),
        session_id: "s1".into(),
        heartbeat_interval_ms: 15_000,
        idle_timeout_ms: 30_000,
        limits: Some(Limits { max_frame_bytes: 1 << 20, max_inflight, ..Limits::default() }),
        resumed: Some(resumed),
        protocol_version: 1,
        ..pb::Welcome::default()
    }
}

fn position(cursors: &[(&str, u64)]) -> SyncPosition {
    SyncPosition {
        feed_position: 0,
        cursors: cursors
            .iter()
            .map(|(c, s)| Cursor { conversation_id: (*c).into(), seq: *s })
            .collect(),
    }
}

fn message(conv: &str, seq: u64, sender: &str, key: &str) -> Message {
    Message {
        conversation_id: conv.into(),
        seq,
        sender: sender.into(),
        timestamp_ms: 5,
        client_msg_id: key.into(),
        content: Some(Content::text("hi")),
        system: None,
    }
}

/// Connects `builder` through `peer`; returns the client and its stream after `Connected`.
async fn connect(
    builder: ClientBuilder,
    peer: &mut Peer,
    max_inflight: u32,
) -> (Client, EventStream) {
    let (res, _) = tokio::join!(builder.connect(), peer.accept(max_inflight, SyncPage::default()));
    let (client, mut events) = res.unwrap();
    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: false, .. })));
    (client, events)
}

fn send_of(frame: &ClientFrame) -> &pb::Send {
    match &frame.kind {
        Some(client_frame::Kind::Send(send)) => send,
        other => panic!("expected Send, got {other:?}"),
    }
}

fn sync_of(frame: &ClientFrame) -> &pb::Sync {
    match &frame.kind {
        Some(client_frame::Kind::Sync(sync)) => sync,
        other => panic!("expected Sync, got {other:?}"),
    }
}

fn message_seq(event: Option<Event>) -> u64 {
    match event {
        Some(Event::Message(m)) => m.seq,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn given_resume_position_when_connecting_should_send_hello_with_it() {
    let net = Net::new();
    let mut peer = net.offer();
    let pos = position(&[("c", 7)]);
    let builder = net.builder().resume_from(pos.clone());
    let (res, (hello_id, hello)) =
        tokio::join!(builder.connect(), peer.accept(0, SyncPage::default()));
    let (client, mut events) = res.unwrap();

    assert_eq!(hello_id, 1, "request ids start at 1");
    assert_eq!(hello.resume, Some(pos.clone()));
    assert_eq!(hello.token, "tok");
    assert_eq!(hello.protocol_version, 1);
    assert!(hello.client.starts_with("switchboard-rs/"));
    let connected =
        Event::Connected { user_id: "alice".into(), session_id: "s1".into(), reconnect: false };
    assert_eq!(events.next().await, Some(connected));
    assert_eq!(client.user_id(), "alice");
    assert_eq!(client.position(), pos);
}

#[tokio::test(start_paused = true)]
async fn given_bad_token_when_connecting_should_return_the_server_error() {
    let net = Net::new();
    let mut peer = net.offer();
    let script = async {
        let hello = peer.recv().await;
        peer.reply(
            hello.request_id,
            ServerFrame::error(0, ErrorCode::Unauthenticated, "bad").kind.unwrap(),
        )
        .await;
        peer.push(ServerFrame::disconnect(DisconnectReason::AuthFailed, "bye", 0).kind.unwrap())
            .await;
    };
    let (res, ()) = tokio::join!(net.builder().connect(), script);
    let err = res.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn given_two_requests_when_replies_arrive_out_of_order_should_match_each_by_request_id() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let c1 = client.clone();
    let list = tokio::spawn(async move { c1.list_conversations(None, 10).await });
    let first = peer.recv().await;
    let c2 = client.clone();
    let history = tokio::spawn(async move { c2.history("c", HistoryAnchor::Before(9), 5).await });
    let second = peer.recv().await;
    assert!(second.request_id > first.request_id);
    let Some(client_frame::Kind::History(h)) = &second.kind else { panic!("{second:?}") };
    assert_eq!(h.anchor, Some(pb::history::Anchor::BeforeSeq(9)));

    let page = pb::HistoryPage { conversation_id: "c".into(), last_seq: 42, ..Default::default() };
    peer.reply(second.request_id, server_frame::Kind::History(page)).await;
    let convs = pb::ConversationList { next_after: "z".into(), ..Default::default() };
    peer.reply(first.request_id, server_frame::Kind::Conversations(convs)).await;

    assert_eq!(history.await.unwrap().unwrap().last_seq, 42);
    assert_eq!(list.await.unwrap().unwrap().next_after, "z");
}

#[tokio::test(start_paused = true)]
async fn given_send_when_acked_should_return_ack_and_emit_own_message_in_order() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) =
        connect(net.builder().resume_from(position(&[("c", 4)])), &mut peer, 0).await;

    let c = client.clone();
    let send = tokio::spawn(async move { c.send("c", Content::text("hi")).await });
    let frame = peer.recv().await;
    let key = send_of(&frame).client_msg_id.clone();
    assert_eq!(key.len(), 32, "16 random bytes as hex");
    let ack = pb::SendAck {
        conversation_id: "c".into(),
        seq: 5,
        client_msg_id: key.clone(),
        ..Default::default()
    };
    peer.reply(frame.request_id, server_frame::Kind::SendAck(ack)).await;

    assert_eq!(send.await.unwrap().unwrap().seq, 5);
    let Some(Event::Message(m)) = events.next().await else { panic!("no message") };
    assert_eq!((m.seq, m.sender.as_str(), m.client_msg_id.as_str()), (5, "alice", key.as_str()));
    assert_eq!(client.position(), position(&[("c", 5)]));
}

#[tokio::test(start_paused = true)]
async fn given_connection_drop_mid_send_should_resend_with_same_client_msg_id_after_reconnect() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) =
        connect(net.builder().resume_from(position(&[("c", 4)])), &mut peer, 0).await;

    let c = client.clone();
    let send = tokio::spawn(async move { c.send("c", Content::text("hi")).await });
    let first = peer.recv().await;
    let key = send_of(&first).client_msg_id.clone();
    drop(peer); // The broker stored it as seq 5, but the ack is lost with the connection.
    assert!(matches!(events.next().await, Some(Event::Disconnected { reason: None, .. })));

    let mut peer = net.offer();
    let stored = message("c", 5, "alice", &key);
    let resumed = SyncPage { messages: vec![stored.clone()], ..SyncPage::default() };
    let (_, hello) = peer.accept(0, resumed).await;
    assert_eq!(hello.resume, Some(position(&[("c", 4)])), "resumes from the last cursor");
    let again = peer.recv().await;
    assert_eq!(send_of(&again).client_msg_id, key, "same idempotency key");
    let ack = pb::SendAck {
        conversation_id: "c".into(),
        seq: 5,
        client_msg_id: key,
        duplicate: true,
        ..Default::default()
    };
    peer.reply(again.request_id, server_frame::Kind::SendAck(ack)).await;

    let ack = send.await.unwrap().unwrap();
    assert!(ack.duplicate);
    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: true, .. })));
    assert_eq!(events.next().await, Some(Event::Message(stored)));
    // A round trip later nothing else was emitted: the message arrived exactly once.
    let ping = tokio::spawn({
        let c = client.clone();
        async move { c.ping().await }
    });
    let frame = peer.recv_raw().await;
    assert!(matches!(frame.kind, Some(client_frame::Kind::Ping(_))));
    peer.reply(frame.request_id, server_frame::Kind::Pong(pb::Pong::default())).await;
    ping.await.unwrap().unwrap();
    assert_eq!(events.try_next(), None);
}

#[tokio::test(start_paused = true)]
async fn given_request_in_flight_when_connection_drops_should_fail_with_connection_lost() {
    let net = Net::new();
    let mut peer = net.offer();
    let builder = net.builder().reconnect(ReconnectPolicy::disabled());
    let (client, mut events) = connect(builder, &mut peer, 0).await;

    let c = client.clone();
    let list = tokio::spawn(async move { c.list_members("g", None, 0).await });
    peer.recv().await;
    drop(peer);

    assert!(matches!(list.await.unwrap(), Err(Error::ConnectionLost)));
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    assert_eq!(events.next().await, Some(Event::Closed));
    assert_eq!(events.next().await, None);
    assert!(matches!(client.ping().await, Err(Error::Closed)));
}

#[tokio::test(start_paused = true)]
async fn given_disconnect_with_retry_after_should_wait_at_least_that_long_to_reconnect() {
    let net = Net::new();
    let mut peer = net.offer();
    let (_client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let mut next = net.offer();

    let start = Instant::now();
    peer.push(ServerFrame::disconnect(DisconnectReason::Shutdown, "draining", 5_000).kind.unwrap())
        .await;
    let Some(Event::Disconnected { reason, message }) = events.next().await else { panic!() };
    assert_eq!((reason, message.as_str()), (Some(DisconnectReason::Shutdown), "draining"));
    next.accept(0, SyncPage::default()).await;
    assert!(start.elapsed() >= Duration::from_secs(5), "waited {:?}", start.elapsed());
    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: true, .. })));
}

#[tokio::test(start_paused = true)]
async fn given_static_token_rejected_on_reconnect_should_close_and_fail_waiting_sends() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let mut next = net.offer();
    drop(peer);
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));

    let c = client.clone();
    let send = tokio::spawn(async move { c.send("c", Content::text("later")).await });
    let hello = next.recv().await;
    next.reply(
        hello.request_id,
        ServerFrame::error(0, ErrorCode::Unauthenticated, "expired").kind.unwrap(),
    )
    .await;

    assert_eq!(events.next().await, Some(Event::Closed));
    assert!(matches!(send.await.unwrap(), Err(Error::Closed)));
}

#[tokio::test(start_paused = true)]
async fn given_accepted_refresh_should_return_the_expiry_and_reconnect_with_the_new_token() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let c = client.clone();
    let refresh = tokio::spawn(async move { c.refresh_token("tok2").await });
    let frame = peer.recv().await;
    let Some(client_frame::Kind::RefreshToken(r)) = &frame.kind else { panic!("{frame:?}") };
    assert_eq!(r.token, "tok2");
    let ok = pb::RefreshTokenOk { expires_at_ms: 1_700_000_000_000 };
    peer.reply(frame.request_id, server_frame::Kind::RefreshTokenOk(ok)).await;
    assert_eq!(refresh.await.unwrap().unwrap(), 1_700_000_000_000);

    // The session expires anyway (say, the application stopped refreshing): the reason is
    // surfaced, and the reconnect uses the refreshed token.
    let mut next = net.offer();
    peer.push(ServerFrame::disconnect(DisconnectReason::TokenExpired, "expired", 0).kind.unwrap())
        .await;
    let Some(Event::Disconnected { reason, .. }) = events.next().await else { panic!() };
    assert_eq!(reason, Some(DisconnectReason::TokenExpired));
    let (_, hello) = next.accept(0, SyncPage::default()).await;
    assert_eq!(hello.token, "tok2");
}

#[tokio::test(start_paused = true)]
async fn given_refused_refresh_should_fail_with_code_and_reason_and_keep_the_old_token() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let c = client.clone();
    let refresh = tokio::spawn(async move { c.refresh_token("bobs").await });
    let frame = peer.recv().await;
    let mut refused = ServerFrame::error(frame.request_id, ErrorCode::Forbidden, "another user");
    if let Some(server_frame::Kind::Error(e)) = refused.kind.as_mut() {
        e.reason = "subject_mismatch".into();
    }
    peer.reply(frame.request_id, refused.kind.unwrap()).await;
    let err = refresh.await.unwrap().unwrap_err();
    assert_eq!((err.code(), err.reason()), (Some(ErrorCode::Forbidden), Some("subject_mismatch")));

    let mut next = net.offer();
    drop(peer);
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    let (_, hello) = next.accept(0, SyncPage::default()).await;
    assert_eq!(hello.token, "tok");
}

#[tokio::test(start_paused = true)]
async fn given_static_token_expired_on_reconnect_should_close() {
    let net = Net::new();
    let mut peer = net.offer();
    let (_client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let mut next = net.offer();
    peer.push(ServerFrame::disconnect(DisconnectReason::TokenExpired, "expired", 0).kind.unwrap())
        .await;
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    let hello = next.recv().await;
    let expired = ServerFrame::error(0, ErrorCode::TokenExpired, "token expired");
    next.reply(hello.request_id, expired.kind.unwrap()).await;
    assert_eq!(events.next().await, Some(Event::Closed));
}

#[tokio::test(start_paused = true)]
async fn given_gap_in_pushes_should_sync_until_has_more_is_false() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) =
        connect(net.builder().resume_from(position(&[("c", 1)])), &mut peer, 0).await;

    peer.push(server_frame::Kind::Message(message("c", 3, "bob", "b3"))).await;
    let first = peer.recv().await;
    assert_eq!(sync_of(&first).position, Some(position(&[("c", 1)])));
    assert!(sync_of(&first).continuation.is_empty());
    let page = SyncPage {
        messages: vec![message("c", 2, "bob", "b2")],
        has_more: true,
        continuation: Bytes::from_static(b"next"),
        ..SyncPage::default()
    };
    peer.reply(first.request_id, server_frame::Kind::Sync(page)).await;
    let second = peer.recv().await;
    assert_eq!(sync_of(&second).position, Some(position(&[("c", 3)])), "current cursors");
    assert_eq!(sync_of(&second).continuation, Bytes::from_static(b"next"));
    peer.reply(second.request_id, server_frame::Kind::Sync(SyncPage::default())).await;

    assert_eq!(message_seq(events.next().await), 2);
    assert_eq!(message_seq(events.next().await), 3);

    let c = client.clone();
    let forced = tokio::spawn(async move { c.sync_now().await });
    let third = peer.recv().await;
    sync_of(&third);
    peer.reply(third.request_id, server_frame::Kind::Sync(SyncPage::default())).await;
    forced.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn given_idle_connection_should_ping_every_heartbeat_interval() {
    let net = Net::new();
    let mut peer = net.offer();
    let (_client, _events) = connect(net.builder(), &mut peer, 0).await;
    let start = Instant::now();
    for n in 1..=3u32 {
        let frame = peer.recv_raw().await;
        assert!(matches!(frame.kind, Some(client_frame::Kind::Ping(_))), "{frame:?}");
        assert!(start.elapsed() >= Duration::from_secs(15) * n);
        peer.reply(frame.request_id, server_frame::Kind::Pong(pb::Pong::default())).await;
    }
}

#[tokio::test(start_paused = true)]
async fn given_silent_broker_should_drop_the_connection_and_reconnect() {
    let net = Net::new();
    let mut peer = net.offer();
    let (_client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let mut next = net.offer();
    // Pings are read but never answered.
    let Some(Event::Disconnected { reason: None, message }) = events.next().await else { panic!() };
    assert!(message.contains("no frame"), "{message}");
    next.accept(0, SyncPage::default()).await;
    drop(peer);
}

#[tokio::test(start_paused = true)]
async fn given_max_inflight_one_should_hold_second_request_until_first_is_answered() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 1).await;

    let c1 = client.clone();
    let a = tokio::spawn(async move { c1.leave("a").await });
    let first = peer.recv().await;
    let c2 = client.clone();
    let b = tokio::spawn(async move { c2.leave("b").await });
    assert!(timeout(Duration::from_secs(1), peer.recv()).await.is_err(), "held back");

    let done = pb::MembershipResult { conversation_id: "a".into(), ..Default::default() };
    peer.reply(first.request_id, server_frame::Kind::Membership(done)).await;
    let second = peer.recv().await;
    let done = pb::MembershipResult { conversation_id: "b".into(), ..Default::default() };
    peer.reply(second.request_id, server_frame::Kind::Membership(done)).await;
    assert_eq!(a.await.unwrap().unwrap().conversation_id, "a");
    assert_eq!(b.await.unwrap().unwrap().conversation_id, "b");
}

#[tokio::test(start_paused = true)]
async fn given_reply_of_wrong_type_should_fail_request_and_reconnect() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;
    let mut next = net.offer();

    let c = client.clone();
    let leave = tokio::spawn(async move { c.leave("a").await });
    let frame = peer.recv().await;
    peer.reply(frame.request_id, server_frame::Kind::Pong(pb::Pong::default())).await;

    assert!(matches!(leave.await.unwrap(), Err(Error::Protocol(_))));
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    next.accept(0, SyncPage::default()).await;
    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: true, .. })));
}

#[tokio::test(start_paused = true)]
async fn given_close_should_emit_closed_and_fail_new_requests() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, mut events) = connect(net.builder(), &mut peer, 0).await;
    client.close().await;
    assert_eq!(events.next().await, Some(Event::Closed));
    assert!(matches!(client.send("c", Content::text("x")).await, Err(Error::Closed)));
    assert!(peer.0.next().await.is_none(), "connection closed");
}

#[tokio::test(start_paused = true)]
async fn given_token_provider_when_token_rejected_on_reconnect_should_retry_with_a_fresh_token() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let net = Net::new();
    let mut peer = net.offer();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let builder = net.builder().token_provider(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, io::Error>(format!("t{n}")) }
    });
    let (res, (_, hello)) = tokio::join!(builder.connect(), peer.accept(0, SyncPage::default()));
    let (_client, mut events) = res.unwrap();
    assert_eq!(hello.token, "t1");
    assert!(matches!(events.next().await, Some(Event::Connected { .. })));

    let mut second = net.offer();
    let mut third = net.offer();
    drop(peer);
    let hello = second.recv().await;
    let Some(client_frame::Kind::Hello(h)) = &hello.kind else { panic!("{hello:?}") };
    assert_eq!(h.token, "t2");
    let rejected = ServerFrame::error(0, ErrorCode::Unauthenticated, "expired").kind.unwrap();
    second.reply(hello.request_id, rejected).await;

    let (_, h) = third.accept(0, SyncPage::default()).await;
    assert_eq!(h.token, "t3", "not permanent: a fresh token is fetched");
    assert!(matches!(events.next().await, Some(Event::Disconnected { .. })));
    assert!(matches!(events.next().await, Some(Event::Connected { reconnect: true, .. })));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn given_send_over_broker_frame_limit_should_fail_typed_and_keep_the_connection() {
    let net = Net::new();
    let mut peer = net.offer();
    let (client, _events) = connect(net.builder(), &mut peer, 0).await;

    let huge = Content::text("x".repeat(2 << 20));
    let err = client.send("c", huge).await.unwrap_err();
    assert!(matches!(err, Error::Frame(pb::FrameError::TooLarge { .. })), "{err:?}");

    let c = client.clone();
    let ping = tokio::spawn(async move { c.ping().await });
    let frame = peer.recv_raw().await;
    peer.reply(frame.request_id, server_frame::Kind::Pong(pb::Pong::default())).await;
    ping.await.unwrap().unwrap();
}

#[tokio::test]
async fn given_tcp_address_should_connect_and_handshake_over_tcp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let broker = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = Framed::new(stream, ServerCodec::default());
        let hello = framed.next().await.unwrap().unwrap();
        let reply = server_frame::Kind::Welcome(welcome(0, SyncPage::default()));
        framed.send(ServerFrame::reply(hello.request_id, reply)).await.unwrap();
        let ping = framed.next().await.unwrap().unwrap();
        let pong = server_frame::Kind::Pong(pb::Pong::default());
        framed.send(ServerFrame::reply(ping.request_id, pong)).await.unwrap();
        framed.next().await.is_none()
    });
    let (client, _events) = Client::builder(addr).token("tok").connect().await.unwrap();
    assert_eq!(client.user_id(), "alice");
    client.ping().await.unwrap();
    client.close().await;
    assert!(broker.await.unwrap(), "the client closed the connection");
}

#[tokio::test]
async fn given_nothing_listening_when_connecting_should_fail_without_retrying() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = Client::builder(addr).token("tok").connect().await.unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
}

mod awareness;
