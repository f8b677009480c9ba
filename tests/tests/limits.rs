//! Rate limits and resource limits: typed errors with retry hints; nothing stored.

use std::time::Duration;

use switchboard_protocol::{ClientFrame, DisconnectReason, ErrorCode, client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn, hello};

fn send(conv: &str, key: &str) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(key)),
    })
}

fn error(kind: server_frame::Kind) -> switchboard_protocol::Error {
    match kind {
        server_frame::Kind::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn given_sender_over_the_rate_should_be_rate_limited_with_retry_after_and_store_nothing() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "limits.send_rate_per_sec=2",
        "--set",
        "limits.send_burst=3",
    ]));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    for i in 0..3 {
        assert!(matches!(
            alice.request(send(&conv, &format!("k{i}"))).await,
            server_frame::Kind::SendAck(_)
        ));
    }
    let e = error(alice.request(send(&conv, "k3")).await);
    assert_eq!(e.code, ErrorCode::RateLimited as i32);
    assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 500, "{e:?}");
    let page = match alice
        .request(client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: conv.clone(),
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::History(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(page.messages.len(), 4, "creation + 3; the rejected send was not stored");
    // After the hinted wait, the same key goes through.
    tokio::time::sleep(Duration::from_millis(e.retry_after_ms + 20)).await;
    assert!(
        matches!(alice.request(send(&conv, "k3")).await, server_frame::Kind::SendAck(a) if a.seq == 5)
    );
    // The limit is per user, not per connection.
    let (mut alice2, _) = broker.raw_as("alice").await;
    let e = error(alice2.request(send(&conv, "k4")).await);
    assert_eq!(e.code, ErrorCode::RateLimited as i32);
}

#[tokio::test]
async fn given_typing_over_the_rate_should_be_rate_limited() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "limits.typing_rate_per_sec=1",
        "--set",
        "limits.typing_burst=2",
    ]));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    let typing = || {
        client_frame::Kind::Typing(switchboard_protocol::Typing {
            conversation_id: conv.clone(),
            active: true,
        })
    };
    assert!(matches!(alice.request(typing()).await, server_frame::Kind::Ack(_)));
    assert!(matches!(alice.request(typing()).await, server_frame::Kind::Ack(_)));
    assert_eq!(error(alice.request(typing()).await).code, ErrorCode::RateLimited as i32);
}

#[tokio::test]
async fn given_too_many_sessions_for_a_user_should_refuse_the_next_with_connection_limit() {
    let broker =
        Broker::start_with(Options::with_args(&["--set", "limits.max_connections_per_user=2"]));
    let (_a, _) = broker.raw_as("alice").await;
    let (_b, _) = broker.raw_as("alice").await;
    let mut c = broker.raw().await;
    c.send(ClientFrame::request(1, hello(&broker.token("alice")))).await;
    let frames = c.until_closed().await;
    assert_eq!(error(frames[0].kind.clone().expect("kind")).code, ErrorCode::LimitExceeded as i32);
    match frames.last().and_then(|f| f.kind.clone()) {
        Some(server_frame::Kind::Disconnect(d)) => {
            assert_eq!(d.reason, DisconnectReason::ConnectionLimit as i32)
        }
        other => panic!("{other:?}"),
    }
    // Other users are unaffected.
    broker.raw_as("bob").await;
}

#[tokio::test]
async fn given_too_many_new_connections_from_one_address_should_refuse_with_retry_after() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "limits.connect_rate_per_ip=1",
        "--set",
        "limits.connect_burst_per_ip=3",
    ]));
    let mut kept: Vec<RawConn> = Vec::new();
    for _ in 0..3 {
        kept.push(broker.raw_as("alice").await.0);
    }
    let mut c = broker.raw().await;
    let frames = c.until_closed().await;
    assert_eq!(error(frames[0].kind.clone().expect("kind")).code, ErrorCode::RateLimited as i32);
    match frames.last().and_then(|f| f.kind.clone()) {
        Some(server_frame::Kind::Disconnect(d)) => {
            assert_eq!(d.reason, DisconnectReason::RateLimited as i32);
            assert!(d.retry_after_ms > 0);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_user_in_too_many_conversations_should_not_create_another() {
    let broker =
        Broker::start_with(Options::with_args(&["--set", "limits.max_conversations_per_user=2"]));
    let (mut alice, _) = broker.raw_as("alice").await;
    alice.create_direct("bob").await;
    alice.create_direct("carol").await;
    let req = client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
        kind: switchboard_protocol::ConversationKind::Direct as i32,
        members: vec!["dave".into()],
        ..Default::default()
    });
    assert_eq!(error(alice.request(req).await).code, ErrorCode::LimitExceeded as i32);
}

#[tokio::test]
async fn given_user_at_the_conversation_limit_should_still_reopen_one_they_are_in() {
    let broker =
        Broker::start_with(Options::with_args(&["--set", "limits.max_conversations_per_user=1"]));
    let (mut alice, _) = broker.raw_as("alice").await;
    let first = alice.create_direct("bob").await;
    assert_eq!(alice.create_direct("bob").await, first);
}

fn send_body(conv: &str, key: &str, body: usize) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text("b".repeat(body))),
    })
}

/// A connection over any transport, for requests.
enum Conn {
    Tcp(RawConn),
    Ws(switchboard_tests::WsConn),
}

impl Conn {
    async fn request(&mut self, kind: client_frame::Kind) -> server_frame::Kind {
        match self {
            Self::Tcp(c) => c.request(kind).await,
            Self::Ws(c) => c.request(kind).await,
        }
    }
}

#[tokio::test]
async fn given_bodies_and_frames_over_the_limits_should_be_refused_alike_on_tcp_and_websocket() {
    use switchboard_tests::{WsConn, WsProto};
    let broker = Broker::start_with(Options::with_args(&[
        "--max-frame-bytes",
        "65536",
        "--max-body-bytes",
        "32768",
    ]));
    let (mut setup, _) = broker.raw_as("alice").await;
    let conv = setup.create_direct("bob").await;
    let mut conns = vec![("tcp", Conn::Tcp(broker.raw_as("alice").await.0))];
    for proto in [WsProto::Binary, WsProto::Json] {
        let mut ws = WsConn::connect(broker.http, proto, None).await.expect("ws");
        ws.request(hello(&broker.token("alice"))).await;
        conns.push((proto.name(), Conn::Ws(ws)));
    }
    for (name, c) in &mut conns {
        // One byte over the body limit: a typed error, and the connection stays.
        let e = error(c.request(send_body(&conv, &format!("{name}-big"), 32_769)).await);
        assert_eq!(e.code, ErrorCode::TooLarge as i32, "{name}: {e:?}");
        let ok = c.request(send_body(&conv, &format!("{name}-max"), 32_768)).await;
        assert!(matches!(ok, server_frame::Kind::SendAck(_)), "{name}: {ok:?}");
    }
    // A frame over the frame limit closes the connection, on TCP and on binary WebSocket.
    let mut tcp = broker.raw().await;
    tcp.send_bytes(&70_000u32.to_be_bytes()).await.expect("write");
    let frames = tcp.until_closed().await;
    assert!(frames.iter().any(|f| matches!(&f.kind,
        Some(server_frame::Kind::Disconnect(d)) if d.reason == DisconnectReason::FrameTooLarge as i32)));
    let mut ws = WsConn::connect(broker.http, WsProto::Binary, None).await.expect("ws");
    ws.send_raw(tokio_tungstenite::tungstenite::Message::Binary(vec![0u8; 70_000].into())).await;
    let frames = ws.until_closed().await;
    assert!(
        frames.iter().any(|f| matches!(&f.kind,
            Some(server_frame::Kind::Error(e)) if e.code == ErrorCode::TooLarge as i32)),
        "{frames:?}"
    );
    assert!(frames.iter().any(|f| matches!(&f.kind,
        Some(server_frame::Kind::Disconnect(d)) if d.reason == DisconnectReason::FrameTooLarge as i32)));
    // Nothing over the limit was stored.
    let log = setup.log(&conv).await;
    assert!(log.iter().all(|(_, k)| !k.ends_with("-big")), "{log:?}");
    assert_eq!(log.iter().filter(|(_, k)| k.ends_with("-max")).count(), 3);
}

#[tokio::test]
async fn given_group_and_presence_limits_should_refuse_requests_beyond_them() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "limits.max_group_members=3",
        "--set",
        "limits.max_members_per_request=2",
        "--set",
        "limits.max_presence_users=2",
        "--set",
        "limits.max_presence_subscriptions=3",
    ]));
    let (mut c, _) = broker.raw_as("alice").await;
    let create = |members: &[&str]| {
        client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            name: "capped".into(),
            members: members.iter().map(ToString::to_string).collect(),
            ..Default::default()
        })
    };
    let e = error(c.request(create(&["b", "c", "d"])).await);
    assert_eq!(e.code, ErrorCode::LimitExceeded as i32, "members per request: {e:?}");
    let group = match c.request(create(&["b", "c"])).await {
        server_frame::Kind::Conversation(g) => g.conversation_id,
        other => panic!("{other:?}"),
    };
    let e = error(
        c.request(client_frame::Kind::AddMembers(switchboard_protocol::AddMembers {
            conversation_id: group,
            users: vec!["d".into()],
        }))
        .await,
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded as i32, "group size: {e:?}");

    let users = |names: &[&str]| names.iter().map(ToString::to_string).collect::<Vec<_>>();
    let e = error(
        c.request(client_frame::Kind::PresenceQuery(switchboard_protocol::PresenceQuery {
            users: users(&["b", "c", "d"]),
        }))
        .await,
    );
    assert_eq!(e.code, ErrorCode::LimitExceeded as i32, "presence users per request: {e:?}");
    let subscribe = |names: &[&str]| {
        client_frame::Kind::PresenceSubscribe(switchboard_protocol::PresenceSubscribe {
            users: users(names),
        })
    };
    assert!(!matches!(c.request(subscribe(&["b", "c"])).await, server_frame::Kind::Error(_)));
    assert!(!matches!(c.request(subscribe(&["d"])).await, server_frame::Kind::Error(_)));
    let e = error(c.request(subscribe(&["e"])).await);
    assert_eq!(e.code, ErrorCode::LimitExceeded as i32, "subscriptions per session: {e:?}");
}
