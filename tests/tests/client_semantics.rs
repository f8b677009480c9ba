//! Receipts, typing and presence through the Rust client crate, end to end.

use switchboard_client::{Content, Event, EventStream};
use switchboard_tests::{Broker, Options, WAIT, messages};

async fn next_matching<T>(events: &mut EventStream, f: impl Fn(&Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(e)) => {
                if let Some(t) = f(&e) {
                    return t;
                }
            }
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("timed out waiting for an event"),
        }
    }
}

#[tokio::test]
async fn given_client_handing_messages_to_the_app_should_ack_delivery_and_the_sender_should_hear_of_reads()
 {
    let broker = Broker::start();
    let (alice, mut alice_events) = broker.client("alice").await;
    let conv = alice.create_direct("bob").await.expect("create").conversation_id;
    let (bob, mut bob_events) = broker.client("bob").await;
    let ack = alice.send(&conv, Content::text("did you get this?")).await.expect("send");
    messages(&mut bob_events, &conv, 2).await;

    // Bob's client acknowledged delivery on its own.
    let delivered = next_matching(&mut alice_events, |e| match e {
        Event::Receipt(r) if r.user_id == "bob" && r.delivered_seq >= ack.seq => Some(r.clone()),
        _ => None,
    })
    .await;
    assert!(delivered.read_seq < ack.seq, "delivered, not yet read");

    // The application marks it read.
    let mine = bob.mark_read(&conv, ack.seq).await.expect("mark read");
    assert_eq!(mine.read_seq, ack.seq);
    next_matching(&mut alice_events, |e| match e {
        Event::Receipt(r) if r.user_id == "bob" && r.read_seq == ack.seq => Some(()),
        _ => None,
    })
    .await;
    let list = alice.receipts(&conv, None, 0).await.expect("receipts");
    let read_by =
        list.receipts.iter().filter(|r| r.user_id != "alice" && r.read_seq >= ack.seq).count();
    assert_eq!(read_by, 1, "read by 1 of 1");
}

#[tokio::test]
async fn given_typing_and_presence_should_arrive_as_client_events() {
    let broker = Broker::start_with(Options::with_args(&["--set", "presence.grace_ms=200"]));
    let (alice, mut alice_events) = broker.client("alice").await;
    let conv = alice.create_direct("bob").await.expect("create").conversation_id;
    let (bob, mut bob_events) = broker.client("bob").await;
    messages(&mut bob_events, &conv, 1).await;
    let online = next_matching(&mut alice_events, |e| match e {
        Event::Presence(p) if p.user_id == "bob" => Some(p.clone()),
        _ => None,
    })
    .await;
    assert!(online.online);

    bob.typing(&conv, true).await.expect("typing");
    let t = next_matching(&mut alice_events, |e| match e {
        Event::Typing(t) => Some(t.clone()),
        _ => None,
    })
    .await;
    assert_eq!((t.user_id.as_str(), t.active), ("bob", true));

    let p = alice.presence(["bob", "carol"]).await.expect("presence");
    assert!(p[0].online && !p[1].online);
    bob.close().await;
    let offline = next_matching(&mut alice_events, |e| match e {
        Event::Presence(p) if p.user_id == "bob" && !p.online => Some(p.clone()),
        _ => None,
    })
    .await;
    assert!(offline.last_seen_ms > 0);
}
