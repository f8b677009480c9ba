//! Delivered/read receipts, unread counts across devices, and typing indicators.

use std::time::Duration;

use switchboard_protocol::{ErrorCode, Receipt, ServerFrame, client_frame, server_frame};
use switchboard_tests::{Broker, RawConn};

fn send(conv: &str, key: &str) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(key)),
    })
}

async fn mark_read(c: &mut RawConn, conv: &str, seq: u64) -> Receipt {
    let req = client_frame::Kind::MarkRead(switchboard_protocol::MarkRead {
        conversation_id: conv.into(),
        seq,
    });
    match c.request(req).await {
        server_frame::Kind::Receipt(r) => r,
        other => panic!("expected Receipt, got {other:?}"),
    }
}

/// Collects pushes matching `f` for `within`.
async fn pushes<T>(
    c: &mut RawConn,
    within: Duration,
    f: impl Fn(ServerFrame) -> Option<T>,
) -> Vec<T> {
    let mut out: Vec<T> = c.pushes.drain(..).filter_map(&f).collect();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(frame)) = tokio::time::timeout_at(deadline, c.recv()).await {
        out.extend(f(frame));
    }
    out
}

fn receipt_of(user: &'static str) -> impl Fn(ServerFrame) -> Option<Receipt> {
    move |f| match f.kind {
        Some(server_frame::Kind::ReceiptEvent(r)) if r.user_id == user => Some(r),
        _ => None,
    }
}

async fn unread(c: &mut RawConn, conv: &str) -> u64 {
    match c.request(client_frame::Kind::ListConversations(Default::default())).await {
        server_frame::Kind::Conversations(l) => {
            l.conversations.iter().find(|s| s.conversation_id == conv).expect("listed").unread_count
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_receipts_should_be_monotonic_coalesced_and_reach_the_sender() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    let (mut bob, _) = broker.raw_as("bob").await;
    for i in 0..5 {
        alice.request(send(&conv, &format!("m{i}"))).await; // seqs 2..=6
    }
    let r = mark_read(&mut bob, &conv, 4).await;
    assert_eq!((r.read_seq, r.delivered_seq), (4, 4), "read implies delivered");
    let seen = pushes(&mut alice, Duration::from_millis(500), receipt_of("bob")).await;
    assert_eq!(
        seen.iter().map(|r| r.read_seq).collect::<Vec<_>>(),
        vec![4],
        "the sender hears at once"
    );

    // Lower values are ignored; beyond the log is clamped to it.
    assert_eq!(mark_read(&mut bob, &conv, 2).await.read_seq, 4);
    assert_eq!(mark_read(&mut bob, &conv, 5).await.read_seq, 5);
    assert_eq!(mark_read(&mut bob, &conv, 99).await.read_seq, 6);
    // Within the second after the first push, changes coalesce into one more push.
    let seen = pushes(&mut alice, Duration::from_millis(1_500), receipt_of("bob")).await;
    assert_eq!(seen.iter().map(|r| r.read_seq).collect::<Vec<_>>(), vec![6]);

    // "Read by": every member's watermarks.
    let list = match alice
        .request(client_frame::Kind::GetReceipts(switchboard_protocol::GetReceipts {
            conversation_id: conv.clone(),
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Receipts(l) => l,
        other => panic!("{other:?}"),
    };
    let by_user: Vec<(String, u64)> =
        list.receipts.iter().map(|r| (r.user_id.clone(), r.read_seq)).collect();
    assert_eq!(
        by_user,
        vec![("alice".into(), 6), ("bob".into(), 6)],
        "alice's own sends count as read"
    );

    // Non-members get nothing.
    let (mut eve, _) = broker.raw_as("eve").await;
    let req = client_frame::Kind::MarkRead(switchboard_protocol::MarkRead {
        conversation_id: conv,
        seq: 1,
    });
    match eve.request(req).await {
        server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::NotFound as i32),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_two_devices_when_one_reads_should_clear_unread_on_both_and_tell_the_other() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    let (mut phone, _) = broker.raw_as("bob").await;
    let (mut laptop, _) = broker.raw_as("bob").await;
    for i in 0..3 {
        alice.request(send(&conv, &format!("a{i}"))).await; // 2..=4
    }
    assert_eq!(unread(&mut laptop, &conv).await, 3);

    mark_read(&mut phone, &conv, 3).await; // partial
    let seen = pushes(&mut laptop, Duration::from_millis(500), receipt_of("bob")).await;
    assert_eq!(seen.last().map(|r| r.read_seq), Some(3), "the other device is told");
    assert_eq!(unread(&mut laptop, &conv).await, 1);

    mark_read(&mut phone, &conv, 4).await; // coalesced: written within a second
    let mut left = u64::MAX;
    for _ in 0..30 {
        left = unread(&mut laptop, &conv).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0);
    // A reply of bob's own marks what came before read, on every device.
    alice.request(send(&conv, "a3")).await;
    alice.request(send(&conv, "a4")).await;
    assert_eq!(unread(&mut laptop, &conv).await, 2);
    assert!(matches!(
        phone.request(send(&conv, "bob-replies")).await,
        server_frame::Kind::SendAck(_)
    ));
    assert_eq!(unread(&mut laptop, &conv).await, 0);
    assert_eq!(unread(&mut alice, &conv).await, 1, "alice has bob's reply to read");
}

#[tokio::test]
async fn given_typing_should_reach_online_members_only_coalesced_and_never_be_stored() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let group = match alice
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            members: vec!["bob".into(), "carol".into()],
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Conversation(c) => c.conversation_id,
        other => panic!("{other:?}"),
    };
    let (mut bob, _) = broker.raw_as("bob").await;
    let (mut carol, _) = broker.raw_as("carol").await;
    let typing = |active| {
        client_frame::Kind::Typing(switchboard_protocol::Typing {
            conversation_id: group.clone(),
            active,
        })
    };
    let typing_events = |f: ServerFrame| match f.kind {
        Some(server_frame::Kind::Typing(t)) => Some(t),
        _ => None,
    };
    assert!(matches!(alice.request(typing(true)).await, server_frame::Kind::Ack(_)));
    for c in [&mut bob, &mut carol] {
        let t = pushes(c, Duration::from_millis(400), typing_events).await;
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].user_id.as_str(), t[0].active, t[0].expires_in_ms),
            ("alice", true, 5_000)
        );
    }
    // Renewed within the second: not forwarded again.
    alice.request(typing(true)).await;
    assert!(pushes(&mut bob, Duration::from_millis(300), typing_events).await.is_empty());
    // Stopping is forwarded.
    alice.request(typing(false)).await;
    let t = pushes(&mut bob, Duration::from_millis(400), typing_events).await;
    assert_eq!(t.iter().map(|t| t.active).collect::<Vec<_>>(), vec![false]);
    // The typist's own session gets none, and the log holds only the creation entry.
    assert!(pushes(&mut alice, Duration::from_millis(100), typing_events).await.is_empty());
    match alice
        .request(client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: group,
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::History(p) => assert_eq!(p.messages.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_own_send_should_count_as_delivered_and_read_and_marks_should_not_echo() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    alice.request(send(&conv, "m1")).await; // seq 2
    let list = match alice
        .request(client_frame::Kind::GetReceipts(switchboard_protocol::GetReceipts {
            conversation_id: conv.clone(),
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Receipts(l) => l,
        other => panic!("{other:?}"),
    };
    let mine = list.receipts.iter().find(|r| r.user_id == "alice").expect("alice");
    assert_eq!((mine.delivered_seq, mine.read_seq), (2, 2), "read implies delivered");
    let (mut bob, _) = broker.raw_as("bob").await;
    mark_read(&mut bob, &conv, 2).await;
    assert!(
        pushes(&mut bob, Duration::from_millis(400), receipt_of("bob")).await.is_empty(),
        "no echo"
    );
}

#[tokio::test]
async fn given_coalesced_receipt_when_broker_stops_gracefully_should_be_kept() {
    let mut broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    for i in 0..3 {
        alice.request(send(&conv, &format!("m{i}"))).await; // 2..=4
    }
    let (mut bob, _) = broker.raw_as("bob").await;
    mark_read(&mut bob, &conv, 2).await; // written at once
    mark_read(&mut bob, &conv, 4).await; // waits for its second
    drop((alice, bob));
    assert!(broker.terminate().success());
    broker.restart();
    let (mut bob, _) = broker.raw_as("bob").await;
    assert_eq!(unread(&mut bob, &conv).await, 0);
    assert_eq!(mark_read(&mut bob, &conv, 0).await.read_seq, 4);
}

#[tokio::test]
async fn given_a_read_mark_within_the_coalescing_second_when_the_reader_reconnects_should_list_it_as_read()
 {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    for i in 0..3 {
        alice.request(send(&conv, &format!("m{i}"))).await; // 2..=4
    }
    let (mut bob, _) = broker.raw_as("bob").await;
    mark_read(&mut bob, &conv, 2).await; // written and pushed at once
    mark_read(&mut bob, &conv, 4).await; // pushed at the end of its second
    drop(bob);
    // Alice's acknowledged send is in a batch no earlier than bob's mark: once it is durable,
    // so is the mark (well before the coalescing second ends).
    alice.request(send(&conv, "m3")).await; // 5
    let (mut bob, _) = broker.raw_as("bob").await;
    assert_eq!(unread(&mut bob, &conv).await, 1, "only what came after the mark is unread");
}
