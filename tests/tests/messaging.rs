//! Direct conversations, multi-device delivery and history paging.

use switchboard_client::{Content, HistoryAnchor};
use switchboard_protocol::{ConversationKind, client_frame, server_frame};
use switchboard_tests::{Broker, assert_gapless, messages, text};

#[tokio::test]
async fn given_two_users_when_they_exchange_direct_messages_should_each_see_the_whole_log_in_order()
{
    let broker = Broker::start();
    let (alice, mut alice_events) = broker.client("alice").await;
    let (bob, mut bob_events) = broker.client("bob").await;

    let dm = alice.create_direct("bob").await.expect("create");
    assert_eq!(dm.conversation_id, "dm:alice:bob");
    assert_eq!(dm.kind, ConversationKind::Direct as i32);
    let again = bob.create_direct("alice").await.expect("create again");
    assert_eq!(again.conversation_id, dm.conversation_id, "the id is deterministic");
    assert!(!again.created);

    for i in 0..10 {
        let (from, to) = if i % 2 == 0 { (&alice, "bob") } else { (&bob, "alice") };
        let ack = from
            .send(&dm.conversation_id, Content::text(format!("{i} to {to}")))
            .await
            .expect("send");
        assert_eq!(ack.seq, i + 2, "seq 1 is the creation entry");
    }
    // Each side sees the creation entry and all ten messages, its own included, in order.
    for events in [&mut alice_events, &mut bob_events] {
        let log = messages(events, &dm.conversation_id, 11).await;
        assert_gapless(log.iter().map(|m| m.seq), 1);
        assert!(log[0].system.is_some());
        for (i, m) in log[1..].iter().enumerate() {
            assert_eq!(m.sender, if i % 2 == 0 { "alice" } else { "bob" });
            assert!(text(m).is_some_and(|t| t.starts_with(&i.to_string())));
        }
    }
}

#[tokio::test]
async fn given_user_with_two_devices_when_one_sends_should_push_to_the_other_and_ack_the_sender() {
    let broker = Broker::start();
    let (phone, _) = broker.raw_as("carol").await;
    let (mut laptop, _) = broker.raw_as("carol").await;
    let (mut dave, _) = broker.raw_as("dave").await;
    let mut phone = phone;
    let conv = match phone
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: ConversationKind::Direct as i32,
            members: vec!["dave".into()],
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Conversation(c) => c.conversation_id,
        other => panic!("{other:?}"),
    };
    // Every session learns of the new conversation from its feed and gets subscribed.
    for c in [&mut laptop, &mut dave] {
        loop {
            let f = c.recv().await.expect("feed event");
            if matches!(f.kind, Some(server_frame::Kind::FeedEvent(_))) {
                break;
            }
        }
    }
    let reply = phone
        .request(client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: conv.clone(),
            client_msg_id: "k1".into(),
            content: Some(switchboard_protocol::Content::text("hi from the phone")),
        }))
        .await;
    let server_frame::Kind::SendAck(ack) = reply else { panic!("{reply:?}") };
    for c in [&mut laptop, &mut dave] {
        let m = c.next_message().await;
        assert_eq!((m.seq, m.sender.as_str(), m.client_msg_id.as_str()), (ack.seq, "carol", "k1"));
    }
    // The sending session got its ack, not a copy of its own message.
    assert!(
        phone
            .pushes
            .iter()
            .all(|f| !matches!(&f.kind, Some(server_frame::Kind::Message(m)) if m.seq == ack.seq)),
        "{:?}",
        phone.pushes
    );
}

#[tokio::test]
async fn given_long_history_when_paging_both_ways_should_return_every_entry_exactly_once() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let dm = alice.create_direct("bob").await.expect("create").conversation_id;
    for i in 0..95 {
        alice.send(&dm, Content::text(format!("m{i}"))).await.expect("send");
    }
    let last = 96;

    // Backward from the newest, 20 at a time.
    let mut seen = Vec::new();
    let mut anchor = HistoryAnchor::Latest;
    loop {
        let page = alice.history(&dm, anchor, 20).await.expect("history");
        assert_eq!(page.last_seq, last);
        assert_eq!(page.first_seq, 1);
        assert!(page.messages.len() <= 20);
        assert_gapless(page.messages.iter().map(|m| m.seq), page.messages[0].seq);
        seen.splice(0..0, page.messages.iter().map(|m| m.seq));
        if !page.has_more {
            break;
        }
        anchor = HistoryAnchor::Before(page.messages[0].seq);
    }
    assert_gapless(seen.iter().copied(), 1);
    assert_eq!(seen.len() as u64, last);

    // Forward from the start, 30 at a time.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = alice.history(&dm, HistoryAnchor::After(after), 30).await.expect("history");
        seen.extend(page.messages.iter().map(|m| m.seq));
        match page.messages.last() {
            Some(m) if page.has_more => after = m.seq,
            _ => break,
        }
    }
    assert_gapless(seen.iter().copied(), 1);
    assert_eq!(seen.len() as u64, last);

    // Limits are clamped to the maximum; an empty range is an empty page.
    let page = alice.history(&dm, HistoryAnchor::Latest, 10_000).await.expect("history");
    assert_eq!(page.messages.len(), 96);
    let page = alice.history(&dm, HistoryAnchor::After(last), 10).await.expect("history");
    assert!(page.messages.is_empty() && !page.has_more);
}

#[tokio::test]
async fn given_conversations_when_listed_should_report_last_seq_and_unread_counts() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let (bob, _) = broker.client("bob").await;
    let dm = alice.create_direct("bob").await.expect("create").conversation_id;
    let group = alice
        .create_group("team", ["bob"], switchboard_client::HistoryVisibility::Shared)
        .await
        .expect("group")
        .conversation_id;
    for i in 0..3 {
        alice.send(&dm, Content::text(format!("{i}"))).await.expect("send");
    }
    bob.send(&dm, Content::text("bob reads and replies")).await.expect("send");
    alice.send(&dm, Content::text("one more")).await.expect("send");
    alice.send(&group, Content::text("hello team")).await.expect("send");

    let list = bob.list_conversations(None, 0).await.expect("list");
    assert_eq!(list.conversations.len(), 2);
    let dm_summary = list.conversations.iter().find(|c| c.conversation_id == dm).expect("dm");
    assert_eq!(dm_summary.last_seq, 6);
    assert_eq!(dm_summary.read_seq, 5, "bob's own send marks what came before as read");
    assert_eq!(dm_summary.unread_count, 1);
    let g = list.conversations.iter().find(|c| c.conversation_id == group).expect("group");
    assert_eq!((g.unread_count, g.member_count, g.name.as_str()), (1, 2, "team"));

    let list = alice.list_conversations(None, 0).await.expect("list");
    assert!(list.conversations.iter().all(|c| c.unread_count == 0), "{list:?}");
}
