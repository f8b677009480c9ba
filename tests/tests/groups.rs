//! Groups: one order for everyone, membership changes, authorization.

use std::collections::HashSet;

use futures::future::join_all;
use switchboard_client::{Content, Event, FeedEventKind, HistoryAnchor, HistoryVisibility};
use switchboard_protocol::{ErrorCode, client_frame, server_frame, system_event};
use switchboard_tests::{Broker, assert_gapless, messages};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_50_member_group_with_concurrent_senders_should_deliver_one_gapless_order_to_all() {
    const MEMBERS: usize = 50;
    const SENDERS: usize = 10;
    const PER_SENDER: usize = 20;
    let broker = Broker::start();
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("member{i:02}")).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(broker.client(u).await);
    }
    let group = clients[0]
        .0
        .create_group("fifty", users[1..].to_vec(), HistoryVisibility::Shared)
        .await
        .expect("create group")
        .conversation_id;

    // Ten members send at once.
    let sends = (0..SENDERS).map(|s| {
        let client = clients[s * 5].0.clone();
        let group = group.clone();
        async move {
            let mut acks = Vec::new();
            for i in 0..PER_SENDER {
                acks.push(
                    client
                        .send(&group, Content::text(format!("s{s}-{i}")))
                        .await
                        .expect("send")
                        .seq,
                );
            }
            acks
        }
    });
    let acked: Vec<u64> = join_all(sends).await.into_iter().flatten().collect();
    let total = 1 + SENDERS * PER_SENDER;
    assert_eq!(
        acked.iter().collect::<HashSet<_>>().len(),
        SENDERS * PER_SENDER,
        "every ack has its own seq"
    );

    // Everyone sees the same gapless log; each sender's messages in its send order.
    let logs =
        join_all(clients.iter_mut().map(|(_, events)| messages(events, &group, total))).await;
    let reference: Vec<(u64, String, String)> =
        logs[0].iter().map(|m| (m.seq, m.sender.clone(), m.client_msg_id.clone())).collect();
    assert_gapless(reference.iter().map(|r| r.0), 1);
    for log in &logs[1..] {
        let this: Vec<(u64, String, String)> =
            log.iter().map(|m| (m.seq, m.sender.clone(), m.client_msg_id.clone())).collect();
        assert_eq!(this, reference);
    }
    for s in 0..SENDERS {
        let order: Vec<String> = logs[0]
            .iter()
            .filter(|m| m.sender == users[s * 5])
            .filter_map(|m| m.content.as_ref().and_then(|c| c.as_text()).map(str::to_owned))
            .collect();
        let expected: Vec<String> = (0..PER_SENDER).map(|i| format!("s{s}-{i}")).collect();
        assert_eq!(order, expected);
    }
}

#[tokio::test]
async fn given_removed_member_should_stop_receiving_at_once_and_learn_of_the_removal() {
    let broker = Broker::start();
    let (admin, mut admin_events) = broker.client("admin").await;
    let (bob, mut bob_events) = broker.client("bob").await;
    let group = admin
        .create_group("g", ["bob", "carol"], HistoryVisibility::Shared)
        .await
        .expect("create")
        .conversation_id;
    admin.send(&group, Content::text("before")).await.expect("send");
    messages(&mut bob_events, &group, 2).await;

    let result = admin.remove_members(&group, ["bob"]).await.expect("remove");
    assert_eq!(result.changed, vec!["bob".to_owned()]);
    let removal_seq = result.seq;
    admin.send(&group, Content::text("after")).await.expect("send");
    messages(&mut admin_events, &group, 4).await;

    // Bob learns of the removal (feed event) and never sees "after".
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    let mut removed = false;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, bob_events.next()).await {
        match ev {
            Event::Feed(f) if f.conversation_id == group => {
                assert_eq!(f.kind, FeedEventKind::Removed as i32);
                assert_eq!(f.conversation_seq, removal_seq);
                removed = true;
            }
            Event::Message(m) if m.conversation_id == group => {
                assert!(m.seq <= removal_seq, "removed member received seq {}", m.seq);
            }
            _ => {}
        }
    }
    assert!(removed, "bob got no removal event");
    // Nor can he read or write any more.
    let err = bob.send(&group, Content::text("let me in")).await.expect_err("send must fail");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = bob.history(&group, HistoryAnchor::Latest, 10).await.expect_err("history must fail");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(bob.list_conversations(None, 0).await.expect("list").conversations.is_empty());
}

#[tokio::test]
async fn given_non_member_should_not_read_send_list_or_change_membership() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let group = alice
        .create_group("private", ["bob"], HistoryVisibility::Shared)
        .await
        .expect("create")
        .conversation_id;
    alice.send(&group, Content::text("secret")).await.expect("send");
    let dm = alice.create_direct("bob").await.expect("dm").conversation_id;

    let (mut mallory, _) = broker.raw_as("mallory").await;
    for conv in [&group, &dm, &"g:does-not-exist".to_owned()] {
        let requests = vec![
            client_frame::Kind::Send(switchboard_protocol::Send {
                conversation_id: conv.clone(),
                client_msg_id: "x".into(),
                content: Some(switchboard_protocol::Content::text("hi")),
            }),
            client_frame::Kind::History(switchboard_protocol::History {
                conversation_id: conv.clone(),
                ..Default::default()
            }),
            client_frame::Kind::ListMembers(switchboard_protocol::ListMembers {
                conversation_id: conv.clone(),
                ..Default::default()
            }),
            client_frame::Kind::AddMembers(switchboard_protocol::AddMembers {
                conversation_id: conv.clone(),
                users: vec!["mallory".into()],
            }),
            client_frame::Kind::RemoveMembers(switchboard_protocol::RemoveMembers {
                conversation_id: conv.clone(),
                users: vec!["bob".into()],
            }),
            client_frame::Kind::Leave(switchboard_protocol::Leave {
                conversation_id: conv.clone(),
            }),
        ];
        for req in requests {
            match mallory.request(req.clone()).await {
                server_frame::Kind::Error(e) => {
                    assert_eq!(e.code, ErrorCode::NotFound as i32, "{req:?} → {e:?}");
                }
                other => panic!("{req:?} was answered with {other:?}"),
            }
        }
    }
    // A sync with a cursor for someone else's conversation reveals nothing.
    let page = match mallory
        .request(client_frame::Kind::Sync(switchboard_protocol::Sync {
            position: Some(switchboard_protocol::SyncPosition {
                feed_position: 0,
                cursors: vec![switchboard_protocol::Cursor {
                    conversation_id: group.clone(),
                    seq: 0,
                }],
            }),
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Sync(p) => p,
        other => panic!("{other:?}"),
    };
    assert!(page.messages.is_empty() && page.feed_events.is_empty());
    assert_eq!(page.revoked, vec![group.clone()]);
    match mallory.request(client_frame::Kind::ListConversations(Default::default())).await {
        server_frame::Kind::Conversations(l) => assert!(l.conversations.is_empty()),
        other => panic!("{other:?}"),
    }
    // Mallory cannot hijack the group id either.
    match mallory
        .request(client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
            kind: switchboard_protocol::ConversationKind::Group as i32,
            conversation_id: group.clone(),
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::AlreadyExists as i32),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn given_member_who_is_not_admin_should_not_change_membership() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let (bob, _) = broker.client("bob").await;
    let group = alice
        .create_group("g", ["bob"], HistoryVisibility::Shared)
        .await
        .expect("create")
        .conversation_id;
    let err = bob.add_members(&group, ["carol"]).await.expect_err("not admin");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let err = bob.remove_members(&group, ["alice"]).await.expect_err("not admin");
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    // Anyone may leave.
    let left = bob.leave(&group).await.expect("leave");
    assert_eq!(left.changed, vec!["bob".to_owned()]);
    let page = alice.history(&group, HistoryAnchor::Latest, 10).await.expect("history");
    let last = page.messages.last().expect("entries");
    assert!(matches!(
        last.system.as_ref().and_then(|s| s.kind.as_ref()),
        Some(system_event::Kind::MemberLeft(l)) if l.user == "bob"
    ));
}

#[tokio::test]
async fn given_joined_visibility_when_member_added_later_should_read_only_from_joining() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let group = alice
        .create_group("g", ["bob"], HistoryVisibility::Joined)
        .await
        .expect("create")
        .conversation_id;
    for i in 0..5 {
        alice.send(&group, Content::text(format!("early {i}"))).await.expect("send");
    }
    let added = alice.add_members(&group, ["carol"]).await.expect("add");
    assert_eq!(added.seq, 7);
    alice.send(&group, Content::text("late")).await.expect("send");

    let (carol, mut carol_events) = broker.client("carol").await;
    let page = carol.history(&group, HistoryAnchor::Latest, 50).await.expect("history");
    assert_eq!(page.first_seq, 7);
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![7, 8]);
    // The client's initial sync starts at the same place.
    let log = messages(&mut carol_events, &group, 2).await;
    assert_eq!(log.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![7, 8]);
    // Bob, an original member, reads everything.
    let (bob, _) = broker.client("bob").await;
    assert_eq!(
        bob.history(&group, HistoryAnchor::Latest, 50).await.expect("history").messages.len(),
        8
    );
}
