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
