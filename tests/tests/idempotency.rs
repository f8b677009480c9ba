//! Idempotent sends: a repeated `client_msg_id` never creates a second entry.

use switchboard_client::{Content, HistoryAnchor};
use switchboard_protocol::{ClientFrame, client_frame, server_frame};
use switchboard_tests::{Broker, Options};

fn send(conv: &str, key: &str, text: &str) -> client_frame::Kind {
    client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv.into(),
        client_msg_id: key.into(),
        content: Some(switchboard_protocol::Content::text(text)),
    })
}

fn ack(kind: server_frame::Kind) -> switchboard_protocol::SendAck {
    match kind {
        server_frame::Kind::SendAck(a) => a,
        other => panic!("expected SendAck, got {other:?}"),
    }
}

#[tokio::test]
async fn given_repeated_key_immediately_should_return_the_original_ack() {
    let broker = Broker::start();
    let (mut c, _) = broker.raw_as("alice").await;
    let conv = c.create_direct("bob").await;
    let first = ack(c.request(send(&conv, "k-1", "hello")).await);
    assert!(!first.duplicate);
    let again = ack(c.request(send(&conv, "k-1", "hello, edited")).await);
    assert!(again.duplicate);
    assert_eq!((again.seq, again.timestamp_ms), (first.seq, first.timestamp_ms));
    // The same key from another sender is another message.
    let (mut bob, _) = broker.raw_as("bob").await;
    let other = ack(bob.request(send(&conv, "k-1", "bob's")).await);
    assert_eq!(other.seq, first.seq + 1);
    assert!(!other.duplicate);
}

#[tokio::test]
async fn given_repeats_pipelined_with_the_original_should_share_one_seq() {
    let broker = Broker::start_with(Options { durability: "sync".into(), ..Options::default() });
    let (mut c, _) = broker.raw_as("alice").await;
    let conv = c.create_direct("bob").await;
    // Five copies, written back to back: the later ones arrive while the first is still in
    // the open (not yet durable) batch and must wait for its result.
    let ids: Vec<u64> = (0..5).map(|_| c.next_id()).collect();
    for id in &ids {
        c.send(ClientFrame::request(*id, send(&conv, "same", "once"))).await;
    }
    let mut acks = Vec::new();
    for id in &ids {
        acks.push(ack(c.reply_to(*id).await));
    }
    assert!(acks.iter().all(|a| a.seq == acks[0].seq && a.timestamp_ms == acks[0].timestamp_ms));
    assert_eq!(acks.iter().filter(|a| !a.duplicate).count(), 1);
    let page = match c
        .request(client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: conv,
            ..Default::default()
        }))
        .await
    {
        server_frame::Kind::History(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(page.messages.len(), 2, "creation entry plus one message");
}

#[tokio::test]
async fn given_repeated_key_after_restart_should_return_the_original_ack() {
    let mut broker =
        Broker::start_with(Options { durability: "sync".into(), ..Options::default() });
    let (alice, _) = broker.client("alice").await;
    let conv = alice.create_direct("bob").await.expect("create").conversation_id;
    let first = alice.send_with_id(&conv, "survives", Content::text("v1")).await.expect("send");
    alice.close().await;
    assert!(broker.terminate().success());
    broker.restart();

    let (alice, _) = broker.client("alice").await;
    let again = alice.send_with_id(&conv, "survives", Content::text("v2")).await.expect("send");
    assert!(again.duplicate);
    assert_eq!((again.seq, again.timestamp_ms), (first.seq, first.timestamp_ms));
    let page = alice.history(&conv, HistoryAnchor::Latest, 10).await.expect("history");
    assert_eq!(page.messages.len(), 2);
    assert_eq!(page.messages[1].content.as_ref().and_then(|c| c.as_text()), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_broker_killed_during_sends_when_client_reconnects_should_store_each_message_once() {
    const N: usize = 1_000;
    let mut broker =
        Broker::start_with(Options { durability: "sync".into(), ..Options::default() });
    let (alice, _) = broker.client("alice").await;
    let conv = alice.create_direct("bob").await.expect("create").conversation_id;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (alice, conv, acked) = (alice.clone(), conv.clone(), acked.clone());
            tokio::spawn(async move {
                let ack = alice.send(&conv, Content::text(format!("{i}"))).await.expect("send");
                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (i, ack.seq)
            })
        })
        .collect();
    // Kill the broker mid-stream; the client reconnects to the restarted broker and re-sends
    // what was not acknowledged, with the same keys.
    while acked.load(std::sync::atomic::Ordering::Relaxed) < N / 10 {
        tokio::task::yield_now().await;
    }
    broker.kill();
    let at_kill = acked.load(std::sync::atomic::Ordering::Relaxed);
    broker.restart();
    let mut acks = Vec::new();
    for t in tasks {
        acks.push(t.await.expect("task"));
    }
    assert!(at_kill < N, "the broker was killed before every send was acknowledged");
    let mut seqs: Vec<u64> = acks.iter().map(|a| a.1).collect();
    seqs.sort_unstable();
    switchboard_tests::assert_gapless(seqs, 2);
    // The log holds each text exactly once, at the acknowledged seq.
    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = alice.history(&conv, HistoryAnchor::After(after), 200).await.expect("history");
        log.extend(page.messages.iter().skip_while(|m| m.seq == 1).cloned());
        match page.messages.last() {
            Some(m) if page.has_more => after = m.seq,
            _ => break,
        }
    }
    assert_eq!(log.len(), N);
    for (i, seq) in acks {
        let m = &log[usize::try_from(seq).expect("seq") - 2];
        assert_eq!(m.content.as_ref().and_then(|c| c.as_text()), Some(i.to_string().as_str()));
    }
}
