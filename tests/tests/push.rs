//! Push notifications through a webhook, against a real local HTTP receiver.

use std::time::Duration;

use switchboard_protocol::{client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn, WebhookReceiver};

const PUSH_SECRET: &str = "push-secret-0123456789";

fn options(hook: &WebhookReceiver, window_ms: u64) -> Options {
    let url = format!("push.webhook_url=\"{}\"", hook.url);
    let secret = format!("push.secret=\"{PUSH_SECRET}\"");
    let window = format!("push.window_ms={window_ms}");
    Options::with_args(&[
        "--set",
        &url,
        "--set",
        &secret,
        "--set",
        &window,
        "--set",
        "presence.last_seen_flush_ms=100",
    ])
}

async fn send(c: &mut RawConn, conv: &str, key: &str) {
    let req = client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(key)),
    });
    assert!(matches!(c.request(req).await, server_frame::Kind::SendAck(_)));
}

#[tokio::test]
async fn given_burst_to_offline_user_should_post_one_coalesced_signed_notification() {
    let mut hook = WebhookReceiver::start().await;
    let broker = Broker::start_with(options(&hook, 600));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await; // bob has never connected
    for i in 0..3 {
        send(&mut alice, &conv, &format!("m{i}")).await;
    }
    let got = hook.next(Duration::from_secs(5)).await.expect("one notification");
    let body = got.json();
    assert_eq!(body["user_id"], "bob");
    assert_eq!(body["conversation_id"], conv.as_str());
    assert_eq!(body["count"], 3);
    assert_eq!(body["latest_sender"], "alice");
    assert_eq!((body["first_seq"].as_u64(), body["last_seq"].as_u64()), (Some(2), Some(4)));
    assert_eq!(body["text"], "3 new messages from alice");
    let expected =
        format!("sha256={}", switchboard_broker::push::sign(PUSH_SECRET.as_bytes(), &got.body));
    assert_eq!(got.headers.get("x-switchboard-signature"), Some(&expected));
    assert_eq!(got.headers.get("x-switchboard-delivery").map(String::as_str), body["id"].as_str());
    // Alice is online: she is never notified; and the burst made exactly one notification.
    assert!(hook.next(Duration::from_millis(1_200)).await.is_none());
}

#[tokio::test]
async fn given_user_who_comes_online_and_reads_within_the_window_should_get_no_notification() {
    let mut hook = WebhookReceiver::start().await;
    let broker = Broker::start_with(options(&hook, 1_000));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    send(&mut alice, &conv, "hello").await;
    let (mut bob, _) = broker.raw_as("bob").await;
    let req = client_frame::Kind::MarkRead(switchboard_protocol::MarkRead {
        conversation_id: conv.clone(),
        seq: 2,
    });
    assert!(matches!(bob.request(req).await, server_frame::Kind::Receipt(_)));
    assert!(hook.next(Duration::from_millis(2_000)).await.is_none());
    // While bob is online, messages to him notify no one.
    send(&mut alice, &conv, "again").await;
    assert!(hook.next(Duration::from_millis(1_500)).await.is_none());
}

#[tokio::test]
async fn given_pending_notification_when_broker_restarts_should_still_be_delivered() {
    let mut hook = WebhookReceiver::start().await;
    let mut broker = Broker::start_with(options(&hook, 1_500));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    send(&mut alice, &conv, "before-restart").await;
    drop(alice);
    assert!(broker.terminate().success());
    broker.restart();
    let got = hook.next(Duration::from_secs(6)).await.expect("delivered after the restart");
    assert_eq!(got.json()["count"], 1);
    assert_eq!(got.json()["user_id"], "bob");
}

#[tokio::test]
async fn given_failing_webhook_should_retry_with_the_same_delivery_id() {
    let mut hook = WebhookReceiver::start().await;
    hook.respond_with(503);
    let broker = Broker::start_with(options(&hook, 200));
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    send(&mut alice, &conv, "x").await;
    let first = hook.next(Duration::from_secs(5)).await.expect("first attempt");
    hook.respond_with(200);
    let second = hook.next(Duration::from_secs(5)).await.expect("retried");
    assert_eq!(
        first.headers.get("x-switchboard-delivery"),
        second.headers.get("x-switchboard-delivery")
    );
    assert!(hook.next(Duration::from_millis(2_500)).await.is_none(), "delivered once it succeeded");
}
