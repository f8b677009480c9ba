//! Bad input gets a typed error or a `Disconnect` and a close, never a panic, and never
//! disturbs other connections.

use std::time::Duration;

use switchboard_client::Content;
use switchboard_protocol::{
    ClientFrame, DisconnectReason, ErrorCode, ServerFrame, client_frame, server_frame,
};
use switchboard_tests::{Broker, Options, SECRET, hello, messages};

fn error_code(f: &ServerFrame) -> Option<i32> {
    match &f.kind {
        Some(server_frame::Kind::Error(e)) => Some(e.code),
        _ => None,
    }
}

fn disconnect_reason(frames: &[ServerFrame]) -> Option<i32> {
    match frames.last().and_then(|f| f.kind.as_ref()) {
        Some(server_frame::Kind::Disconnect(d)) => Some(d.reason),
        _ => None,
    }
}

/// A conversation that keeps working while the abuse goes on.
struct Bystanders {
    alice: switchboard_client::Client,
    _bob: switchboard_client::Client,
    bob_events: switchboard_client::EventStream,
    conv: String,
    sent: usize,
}

impl Bystanders {
    async fn new(broker: &Broker) -> Self {
        let (alice, _) = broker.client("alice").await;
        let (bob, mut bob_events) = broker.client("bob").await;
        let conv = alice.create_direct("bob").await.expect("create").conversation_id;
        messages(&mut bob_events, &conv, 1).await;
        Self { alice, _bob: bob, bob_events, conv, sent: 0 }
    }

    async fn still_chatting(&mut self) {
        self.sent += 1;
        let ack = self
            .alice
            .send(&self.conv, Content::text(format!("still here {}", self.sent)))
            .await
            .expect("send");
        let m = messages(&mut self.bob_events, &self.conv, 1).await;
        assert_eq!(m[0].seq, ack.seq);
    }
}

#[tokio::test]
async fn given_random_bytes_and_huge_length_prefixes_should_close_those_connections_only() {
    let broker = Broker::start();
    let mut ok = Bystanders::new(&broker).await;

    // A declared length of 4 GiB: rejected from the header alone.
    let mut c = broker.raw().await;
    c.send_bytes(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await.expect("write");
    let frames = c.until_closed().await;
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::TooLarge as i32));
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::FrameTooLarge as i32));
    ok.still_chatting().await;

    // Garbage that parses as a small frame with an invalid body.
    let mut c = broker.raw().await;
    c.send_bytes(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await.expect("write");
    let frames = c.until_closed().await;
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::BadRequest as i32));
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ProtocolError as i32));
    ok.still_chatting().await;

    // Pseudo-random garbage of many shapes, before and after a handshake.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..40 {
        let mut bytes = Vec::new();
        for _ in 0..(16 + round * 7) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        let mut c =
            if round % 2 == 0 { broker.raw().await } else { broker.raw_as("mallory").await.0 };
        let _ = c.send_bytes(&bytes).await;
        // Either the broker closes, or it waits for the rest of a frame: both are fine, as
        // long as it neither crashes nor stalls anyone else.
        drop(c);
    }
    ok.still_chatting().await;
}

#[tokio::test]
async fn given_request_before_hello_should_get_unauthenticated_and_a_close() {
    let broker = Broker::start();
    let mut c = broker.raw().await;
    c.send(ClientFrame::request(
        3,
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: "dm:a:b".into(),
            client_msg_id: "x".into(),
            content: Some(switchboard_protocol::Content::text("hi")),
        }),
    ))
    .await;
    let frames = c.until_closed().await;
    assert_eq!(frames[0].request_id, 3);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::Unauthenticated as i32));
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::ProtocolError as i32));
}

#[tokio::test]
async fn given_unknown_frame_type_after_hello_should_answer_unsupported_and_stay_open() {
    let broker = Broker::start();
    let (mut c, _) = broker.raw_as("alice").await;
    // request_id = 9, then field 99 (a request type from the future), empty.
    c.send_bytes(&[0, 0, 0, 5, 0x08, 0x09, 0x9a, 0x06, 0x00]).await.expect("write");
    let f = c.recv().await.expect("reply");
    assert_eq!(f.request_id, 9);
    assert_eq!(error_code(&f), Some(ErrorCode::Unsupported as i32));
    // Still usable.
    let pong = c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
}

#[tokio::test]
async fn given_bad_tokens_should_get_unauthenticated_then_auth_failed_disconnect() {
    let broker = Broker::start();
    let mut ok = Bystanders::new(&broker).await;
    let now = jsonwebtoken::get_current_timestamp();
    let sign = |claims: serde_json::Value, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    let cases = [
        ("expired", sign(serde_json::json!({"sub": "eve", "exp": now - 3600}), SECRET)),
        (
            "wrong secret",
            sign(serde_json::json!({"sub": "eve", "exp": now + 3600}), "not-the-secret-at-all"),
        ),
        ("no exp", sign(serde_json::json!({"sub": "eve"}), SECRET)),
        ("bad subject", sign(serde_json::json!({"sub": "eve:admin", "exp": now + 3600}), SECRET)),
        (
            "alg none",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJldmUiLCJleHAiOjk5OTk5OTk5OTl9.".into(),
        ),
        ("garbage", "not a token".into()),
    ];
    for (name, token) in cases {
        let mut c = broker.raw().await;
        c.send(ClientFrame::request(1, hello(&token))).await;
        let frames = c.until_closed().await;
        // An expired token has its own code (and every rejection a typed reason: auth.rs).
        let code =
            if name == "expired" { ErrorCode::TokenExpired } else { ErrorCode::Unauthenticated };
        assert_eq!(error_code(&frames[0]), Some(code as i32), "{name}");
        assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::AuthFailed as i32), "{name}");
    }
    // A protocol version from the future is refused with its own code.
    let mut c = broker.raw().await;
    c.send(ClientFrame::request(
        1,
        client_frame::Kind::Hello(switchboard_protocol::Hello {
            protocol_version: 99,
            token: broker.token("eve"),
            ..Default::default()
        }),
    ))
    .await;
    let frames = c.until_closed().await;
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::ProtocolVersion as i32));
    ok.still_chatting().await;
}

#[tokio::test]
async fn given_silent_connection_should_be_closed_after_the_hello_timeout() {
    let broker = Broker::start_with(Options::with_args(&["--hello-timeout-ms", "300"]));
    let mut c = broker.raw().await;
    let started = std::time::Instant::now();
    let frames = c.until_closed().await;
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::HelloTimeout as i32));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn given_idle_session_should_be_closed_after_the_idle_timeout() {
    let broker = Broker::start_with(Options::with_args(&[
        "--idle-timeout-ms",
        "400",
        "--heartbeat-interval-ms",
        "100",
    ]));
    let (mut c, welcome) = broker.raw_as("alice").await;
    assert_eq!((welcome.idle_timeout_ms, welcome.heartbeat_interval_ms), (400, 100));
    // Pings keep it alive...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let pong = c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
        assert!(matches!(pong, server_frame::Kind::Pong(_)));
    }
    // ...silence does not.
    let frames = c.until_closed().await;
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::IdleTimeout as i32));
}

#[tokio::test]
async fn given_invalid_fields_should_get_typed_errors_and_keep_the_connection() {
    let broker = Broker::start_with(Options::with_args(&["--max-body-bytes", "1024"]));
    let (mut c, _) = broker.raw_as("alice").await;
    let send = |conv: &str, key: &str, body: usize| {
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: conv.into(),
            client_msg_id: key.into(),
            content: Some(switchboard_protocol::Content::text("z".repeat(body))),
        })
    };
    let cases = [
        (send("dm:alice:bob", "k", 1025), ErrorCode::TooLarge),
        (send("bad id!", "k", 1), ErrorCode::BadRequest),
        (send("dm:alice:bob", "", 1), ErrorCode::BadRequest),
        (send("dm:alice:bob", &"k".repeat(65), 1), ErrorCode::BadRequest),
        (
            client_frame::Kind::Send(switchboard_protocol::Send {
                conversation_id: "dm:alice:bob".into(),
                client_msg_id: "k".into(),
                content: None,
            }),
            ErrorCode::BadRequest,
        ),
        (
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: switchboard_protocol::ConversationKind::Direct as i32,
                members: vec!["bob".into(), "carol".into()],
                ..Default::default()
            }),
            ErrorCode::BadRequest,
        ),
        (
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: switchboard_protocol::ConversationKind::Direct as i32,
                members: vec!["alice".into()],
                ..Default::default()
            }),
            ErrorCode::BadRequest,
        ),
        (
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: switchboard_protocol::ConversationKind::Group as i32,
                conversation_id: "dm:x:y".into(),
                ..Default::default()
            }),
            ErrorCode::BadRequest,
        ),
        (client_frame::Kind::Hello(Default::default()), ErrorCode::BadRequest),
    ];
    for (req, code) in cases {
        match c.request(req.clone()).await {
            server_frame::Kind::Error(e) => assert_eq!(e.code, code as i32, "{req:?}: {e:?}"),
            other => panic!("{req:?} → {other:?}"),
        }
    }
    let pong = c.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
}

#[tokio::test]
async fn given_forged_sync_continuation_should_not_crash_the_broker() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    // version 1, the conversation, and seq u64::MAX.
    let mut token = vec![1u8, u8::try_from(conv.len()).expect("short id")];
    token.extend_from_slice(conv.as_bytes());
    token.extend_from_slice(&u64::MAX.to_be_bytes());
    for continuation in [token, vec![1, 200, 1, 2, 3], vec![7; 40]] {
        let req = client_frame::Kind::Sync(switchboard_protocol::Sync {
            position: Some(switchboard_protocol::SyncPosition::default()),
            limit: 0,
            continuation: continuation.into(),
        });
        match alice.request(req).await {
            server_frame::Kind::Sync(_) => {}
            server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::BadRequest as i32),
            other => panic!("{other:?}"),
        }
    }
    // Still serving.
    let pong = alice.request(client_frame::Kind::Ping(switchboard_protocol::Ping {})).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)));
}
