//! The HTTP listener and the WebSocket bridge: both subprotocols run the same session logic as
//! TCP; origin checks, limits, health, readiness, metrics, development tokens.

use std::time::Duration;

use switchboard_protocol::{DisconnectReason, ErrorCode, client_frame, server_frame};
use switchboard_tests::{Broker, Options, WsConn, WsProto, http_get, http_request, text};

fn send(conv: &str, key: &str, body: &str) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(body)),
    })
}

async fn ws_as(broker: &Broker, proto: WsProto, user: &str) -> WsConn {
    let mut c = WsConn::connect(broker.http, proto, None).await.expect("upgrade");
    match c.request(switchboard_tests::hello(&broker.token(user))).await {
        server_frame::Kind::Welcome(w) => assert_eq!(w.user_id, user),
        other => panic!("{other:?}"),
    }
    c
}

async fn ws_direct(c: &mut WsConn, other: &str) -> String {
    let req = client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
        kind: switchboard_protocol::ConversationKind::Direct as i32,
        members: vec![other.into()],
        ..Default::default()
    });
    match c.request(req).await {
        server_frame::Kind::Conversation(c) => c.conversation_id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_each_subprotocol_when_two_users_chat_should_run_the_same_session_logic() {
    let broker = Broker::start();
    for proto in [WsProto::Binary, WsProto::Json] {
        let (a, b) = (format!("a-{}", proto.name()), format!("b-{}", proto.name()));
        let (a, b) = (a.replace('.', "_"), b.replace('.', "_"));
        let mut alice = ws_as(&broker, proto, &a).await;
        let conv = ws_direct(&mut alice, &b).await;
        let mut bob = ws_as(&broker, proto, &b).await;
        for i in 0..5 {
            let (from, key) = if i % 2 == 0 { (&mut alice, "a") } else { (&mut bob, "b") };
            match from.request(send(&conv, &format!("{key}{i}"), &format!("hello {i}"))).await {
                server_frame::Kind::SendAck(ack) => assert_eq!(ack.seq, i + 2),
                other => panic!("{other:?}"),
            }
        }
        // Each side received the other's messages, in order, with the text intact.
        let seen_by_bob: Vec<u64> =
            [bob.next_message().await, bob.next_message().await, bob.next_message().await]
                .iter()
                .map(|m| m.seq)
                .collect();
        assert_eq!(seen_by_bob, vec![2, 4, 6]);
        let m = alice.next_message().await;
        assert_eq!((m.seq, text(&m)), (3, Some("hello 1")));
    }
}

#[tokio::test]
async fn given_tcp_binary_ws_and_json_ws_members_should_all_receive_one_delivery() {
    let broker = Broker::start();
    let (mut tcp, _) = broker.raw_as("tcp-user").await;
    let group = match tcp
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            members: vec!["bin-user".into(), "json-user".into()],
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Conversation(c) => c.conversation_id,
        other => panic!("{other:?}"),
    };
    let mut bin = ws_as(&broker, WsProto::Binary, "bin-user").await;
    let mut json = ws_as(&broker, WsProto::Json, "json-user").await;
    let body = "ünïcødé ✓ and a long tail ".repeat(20);
    assert!(matches!(tcp.request(send(&group, "k1", &body)).await, server_frame::Kind::SendAck(_)));
    let (m1, m2) = (bin.next_message().await, json.next_message().await);
    assert_eq!(m1, m2, "the same message, whatever the encoding");
    assert_eq!(text(&m1), Some(body.as_str()));
}

#[tokio::test]
async fn given_disallowed_origin_or_no_subprotocol_should_refuse_the_upgrade() {
    let broker = Broker::start_with(Options::with_args(&[
        "--set",
        "http.allowed_origins=[\"https://chat.example.com\"]",
    ]));
    let err = WsConn::connect(broker.http, WsProto::Json, Some("https://evil.example"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("403"), "{err}");
    assert!(
        WsConn::connect(broker.http, WsProto::Json, Some("https://chat.example.com")).await.is_ok()
    );
    let same_origin = format!("http://{}", broker.http);
    assert!(WsConn::connect(broker.http, WsProto::Binary, Some(&same_origin)).await.is_ok());
    // A plain GET is not an upgrade; an upgrade without our subprotocol is refused.
    assert_eq!(http_get(broker.http, "/ws").await.0, 426);
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = format!("ws://{}/ws", broker.http).into_client_request().expect("request");
    let err = tokio_tungstenite::connect_async(req).await.expect_err("refused");
    assert!(err.to_string().contains("400"), "{err}");
}

#[tokio::test]
async fn given_message_over_the_json_limit_should_get_too_large_then_disconnect() {
    let broker = Broker::start_with(Options::with_args(&[
        "--max-frame-bytes",
        "65536",
        "--max-body-bytes",
        "32768",
    ]));
    let mut c = ws_as(&broker, WsProto::Json, "alice").await;
    // 4/3 of 64 KiB plus 1 KiB is the JSON limit; 100 KB is over it.
    let big = format!("{{\"requestId\":\"9\",\"ping\":{{}},\"pad\":\"{}\"}}", "x".repeat(100_000));
    c.send_raw(tokio_tungstenite::tungstenite::Message::Text(big.into())).await;
    let frames = c.until_closed().await;
    let codes: Vec<_> = frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(server_frame::Kind::Error(e)) => Some(e.code),
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec![ErrorCode::TooLarge as i32]);
    match frames.last().and_then(|f| f.kind.clone()) {
        Some(server_frame::Kind::Disconnect(d)) => {
            assert_eq!(d.reason, DisconnectReason::FrameTooLarge as i32)
        }
        other => panic!("{other:?}"),
    }
    // Just under the limit passes (unknown fields are ignored).
    let mut c = ws_as(&broker, WsProto::Json, "alice").await;
    let ok = format!("{{\"requestId\":\"9\",\"ping\":{{}},\"pad\":\"{}\"}}", "x".repeat(80_000));
    c.send_raw(tokio_tungstenite::tungstenite::Message::Text(ok.into())).await;
    let f = c.recv().await.expect("reply");
    assert!(matches!(f.kind, Some(server_frame::Kind::Pong(_))), "{f:?}");
}

#[tokio::test]
async fn given_garbage_json_should_get_bad_request_then_disconnect() {
    let broker = Broker::start();
    let mut c = ws_as(&broker, WsProto::Json, "alice").await;
    c.send_raw(tokio_tungstenite::tungstenite::Message::Text("{not json".into())).await;
    let frames = c.until_closed().await;
    assert!(
        matches!(&frames[0].kind, Some(server_frame::Kind::Error(e)) if e.code == ErrorCode::BadRequest as i32)
    );
    assert!(
        matches!(&frames.last().and_then(|f| f.kind.clone()), Some(server_frame::Kind::Disconnect(d)) if d.reason == DisconnectReason::ProtocolError as i32)
    );
}

#[tokio::test]
async fn given_http_listener_should_answer_health_readiness_and_metrics() {
    let broker = Broker::start();
    assert_eq!(http_get(broker.http, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(broker.http, "/readyz").await.0, 200);
    let mut c = ws_as(&broker, WsProto::Binary, "alice").await;
    let conv = ws_direct(&mut c, "bob").await;
    assert!(matches!(c.request(send(&conv, "k", "hi")).await, server_frame::Kind::SendAck(_)));
    let mut metrics = String::new();
    for _ in 0..40 {
        metrics = http_get(broker.http, "/metrics").await.1;
        if metrics.contains("switchboard_messages_stored_total 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for needle in [
        "switchboard_connections{transport=\"ws\"} 1",
        "switchboard_messages_stored_total 1",
        "switchboard_frames_in_total{transport=\"ws\",type=\"hello\"} 1",
        "switchboard_frames_in_total{transport=\"ws\",type=\"create_conversation\"} 1",
        "switchboard_frames_in_total{transport=\"ws\",type=\"send\"} 1",
        "switchboard_send_ack_seconds_count 1",
        "switchboard_storage_round_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    assert_eq!(http_get(broker.http, "/nope").await.0, 404);
    // With a configured JWT key there are no development tokens.
    assert_eq!(http_request(broker.http, "POST", "/dev/token", "{\"user\":\"x\"}").await.0, 404);
}

#[tokio::test]
async fn given_development_defaults_should_mint_tokens_that_open_a_session() {
    let broker = Broker::start_with(Options { jwt_secret: false, ..Options::default() });
    let (status, body) =
        http_request(broker.http, "POST", "/dev/token", "{\"user\":\"demo\"}").await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut c = WsConn::connect(broker.http, WsProto::Json, None).await.expect("upgrade");
    match c.request(switchboard_tests::hello(token["token"].as_str().expect("token"))).await {
        server_frame::Kind::Welcome(w) => assert_eq!(w.user_id, "demo"),
        other => panic!("{other:?}"),
    }
    assert_eq!(http_request(broker.http, "POST", "/dev/token", "{\"user\":\"a:b\"}").await.0, 400);
}
