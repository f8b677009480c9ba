//! Offline delivery: everything missed comes back exactly once through `Sync`.

use std::collections::{HashMap, HashSet};

use switchboard_client::{Content, Event, FeedEventKind, HistoryVisibility};
use switchboard_protocol::{Cursor, SyncPosition, client_frame, server_frame};
use switchboard_tests::{Broker, WAIT, assert_gapless};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_client_offline_during_1000_messages_and_added_to_a_group_should_get_all_exactly_once()
 {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let dm = alice.create_direct("bob").await.expect("create").conversation_id;
    alice.send(&dm, Content::text("while bob is online")).await.expect("send");

    // Bob reads what there is, then goes away, keeping his position.
    let (bob, mut bob_events) = broker.client("bob").await;
    switchboard_tests::messages(&mut bob_events, &dm, 2).await;
    let position = bob.position();
    bob.close().await;

    // While he is away: 1,000 messages of 2 KiB (several sync pages), and a new group.
    let body = "x".repeat(2048);
    for i in 0..1_000 {
        alice.send(&dm, Content::text(format!("{i} {body}"))).await.expect("send");
    }
    let group = alice
        .create_group("while away", ["bob"], HistoryVisibility::Shared)
        .await
        .expect("group")
        .conversation_id;
    for i in 0..5 {
        alice.send(&group, Content::text(format!("g{i}"))).await.expect("send");
    }

    let (_bob, mut events) =
        broker.client_builder("bob").resume_from(position).connect().await.expect("reconnect");
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut added = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.get(&dm).map_or(0, Vec::len) < 1_000 || seen.get(&group).map_or(0, Vec::len) < 6 {
        match tokio::time::timeout_at(deadline, events.next()).await.expect("caught up in time") {
            Some(Event::Message(m)) => {
                seen.entry(m.conversation_id.clone()).or_default().push(m.seq)
            }
            Some(Event::Feed(f)) => {
                assert_eq!(
                    (f.kind, f.conversation_id.as_str()),
                    (FeedEventKind::Added as i32, group.as_str())
                );
                added = true;
            }
            Some(_) => {}
            None => panic!("events ended"),
        }
    }
    assert!(added, "bob learned he was added");
    assert_gapless(seen[&dm].iter().copied(), 3);
    assert_gapless(seen[&group].iter().copied(), 1);
    // Nothing more (no duplicates) trickles in afterwards.
    let extra = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        loop {
            if let Some(Event::Message(m)) = events.next().await {
                return m;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "duplicate delivered: {extra:?}");
}

#[tokio::test]
async fn given_sync_pages_when_followed_with_continuation_should_cover_every_entry_once() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let mut convs = Vec::new();
    for peer in ["p1", "p2", "p3"] {
        let c = alice.create_direct(peer).await.expect("create").conversation_id;
        for i in 0..40 {
            alice
                .send(&c, Content::text(format!("{peer}-{i} {}", "y".repeat(30_000))))
                .await
                .expect("send");
        }
        convs.push(c);
    }
    let (mut raw, welcome) = broker.raw_as("alice").await;
    assert_eq!(welcome.feed_position, 3);
    let mut position = SyncPosition::default();
    let mut continuation = bytes::Bytes::new();
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut pages = 0;
    loop {
        let page = raw.sync(position.clone(), continuation).await;
        pages += 1;
        position.feed_position = page.feed_position;
        for m in &page.messages {
            got.entry(m.conversation_id.clone()).or_default().push(m.seq);
        }
        // Advance cursors like a client would.
        let mut cursors: HashMap<String, u64> =
            position.cursors.iter().map(|c| (c.conversation_id.clone(), c.seq)).collect();
        for m in &page.messages {
            cursors.insert(m.conversation_id.clone(), m.seq);
        }
        position.cursors = cursors
            .into_iter()
            .map(|(conversation_id, seq)| Cursor { conversation_id, seq })
            .collect();
        if !page.has_more {
            break;
        }
        continuation = page.continuation;
    }
    assert!(pages > 3, "30 KiB messages must not fit in one page ({pages} pages)");
    assert_eq!(position.feed_position, 3);
    for c in &convs {
        assert_gapless(got[c].iter().copied(), 1);
        assert_eq!(got[c].len(), 41);
    }
}

#[tokio::test]
async fn given_cursor_beyond_the_log_should_report_a_reset_and_unknown_cursors_as_revoked() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let dm = alice.create_direct("bob").await.expect("create").conversation_id;
    alice.send(&dm, Content::text("one")).await.expect("send");
    let (mut raw, _) = broker.raw_as("alice").await;
    let page = raw
        .sync(
            SyncPosition {
                feed_position: 1,
                cursors: vec![
                    Cursor { conversation_id: dm.clone(), seq: 99 },
                    Cursor { conversation_id: "g:gone".into(), seq: 3 },
                ],
            },
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(page.resets.len(), 1);
    assert_eq!((page.resets[0].first_seq, page.resets[0].last_seq), (1, 2));
    assert_eq!(page.revoked, vec!["g:gone".to_owned()]);
    assert!(page.messages.is_empty());
    let seqs: HashSet<u64> = page.feed_events.iter().map(|e| e.user_seq).collect();
    assert!(seqs.is_empty(), "feed position 1 is current");
}

#[tokio::test]
async fn given_resume_in_hello_should_return_the_first_sync_page_in_welcome() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let dm = alice.create_direct("bob").await.expect("create").conversation_id;
    for i in 0..3 {
        alice.send(&dm, Content::text(format!("{i}"))).await.expect("send");
    }
    let mut raw = broker.raw().await;
    let reply = raw
        .request(client_frame::Kind::Hello(switchboard_protocol::Hello {
            protocol_version: 1,
            token: broker.token("bob"),
            resume: Some(SyncPosition {
                feed_position: 0,
                cursors: vec![Cursor { conversation_id: dm.clone(), seq: 2 }],
            }),
            client: String::new(),
        }))
        .await;
    let server_frame::Kind::Welcome(w) = reply else { panic!("{reply:?}") };
    let page = w.resumed.expect("resumed page");
    assert_eq!(page.feed_events.len(), 1);
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert!(!page.has_more);
}

#[tokio::test]
async fn given_more_feed_events_than_a_page_should_page_them_before_the_messages() {
    let broker = Broker::start();
    let (mut alice, _) = broker.raw_as("alice").await;
    const GROUPS: usize = 1_010;
    let ids: Vec<u64> = (0..GROUPS).map(|_| alice.next_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        alice
            .send(switchboard_protocol::ClientFrame::request(
                *id,
                client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                    kind: switchboard_protocol::ConversationKind::Group as i32,
                    members: vec!["bob".into()],
                    conversation_id: format!("g:feed-{i:04}"),
                    ..Default::default()
                }),
            ))
            .await;
    }
    for reply in alice.replies(&ids).await.into_values() {
        assert!(matches!(reply, server_frame::Kind::Conversation(_)), "{reply:?}");
    }
    let (mut bob, welcome) = broker.raw_as("bob").await;
    assert_eq!(welcome.feed_position, GROUPS as u64);
    let mut position = SyncPosition::default();
    let mut continuation = bytes::Bytes::new();
    let (mut events, mut entries, mut pages) = (Vec::new(), HashSet::new(), 0);
    loop {
        let page = bob.sync(position.clone(), continuation).await;
        pages += 1;
        if pages == 1 {
            assert_eq!(page.feed_events.len(), 1_000);
            assert!(page.has_more && page.messages.is_empty());
        }
        events.extend(page.feed_events.iter().map(|e| e.user_seq));
        position.feed_position = page.feed_position;
        for m in &page.messages {
            assert!(entries.insert(m.conversation_id.clone()), "{} twice", m.conversation_id);
            position
                .cursors
                .push(Cursor { conversation_id: m.conversation_id.clone(), seq: m.seq });
        }
        if !page.has_more {
            break;
        }
        continuation = page.continuation;
    }
    assert_gapless(events, 1);
    assert_eq!(entries.len(), GROUPS);
    assert!(pages >= 3, "{pages}");
}

#[tokio::test]
async fn given_cursor_before_the_first_readable_seq_should_report_a_reset_to_it() {
    let broker = Broker::start();
    let (alice, _) = broker.client("alice").await;
    let group = alice
        .create_group("g", ["bob"], HistoryVisibility::Joined)
        .await
        .expect("create")
        .conversation_id;
    alice.send(&group, Content::text("before carol")).await.expect("send");
    alice.add_members(&group, ["carol"]).await.expect("add");
    let (mut carol, _) = broker.raw_as("carol").await;
    let page = carol
        .sync(
            SyncPosition {
                feed_position: 1,
                cursors: vec![Cursor { conversation_id: group.clone(), seq: 0 }],
            },
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(page.resets.len(), 1);
    assert_eq!((page.resets[0].first_seq, page.resets[0].last_seq), (3, 3));
    assert!(page.messages.is_empty());
    let page = carol
        .sync(
            SyncPosition {
                feed_position: 1,
                cursors: vec![Cursor { conversation_id: group, seq: 2 }],
            },
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
}
