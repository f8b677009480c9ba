//! Crash safety: SIGKILL during acknowledged sends loses nothing that was acknowledged.
//!
//! The broker runs with `--durability sync` and is killed at random moments while four
//! writers pipeline sends. After every restart each conversation's log must hold every
//! acknowledged message exactly once at its acknowledged seq, with gapless seqs. The test
//! broker is a debug build, so every ack also asserts that the fsynced watermark covers it; a
//! violation aborts the broker, which this test notices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_protocol::{ClientFrame, client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn};

const WRITERS: usize = 4;
const KILLS: usize = 8;
const WINDOW: usize = 8;

type Acks = Arc<Mutex<HashMap<String, (String, u64)>>>;

/// Sends `key-prefix-n` messages with up to WINDOW in flight until the connection dies.
async fn write_until_killed(mut c: RawConn, conv: String, prefix: String, acks: Acks) {
    let mut inflight: HashMap<u64, String> = HashMap::new();
    let mut n = 0u64;
    loop {
        while inflight.len() < WINDOW {
            let key = format!("{prefix}-{n}");
            n += 1;
            let id = c.next_id();
            let frame = ClientFrame::request(
                id,
                client_frame::Kind::Send(switchboard_protocol::Send {
                    conversation_id: conv.clone(),
                    client_msg_id: key.clone(),
                    content: Some(switchboard_protocol::Content::text(key.clone())),
                }),
            );
            if !c.try_send(frame).await {
                return;
            }
            inflight.insert(id, key);
        }
        let Some(f) = c.try_recv().await else { return };
        if let Some(key) = inflight.remove(&f.request_id) {
            match f.kind {
                Some(server_frame::Kind::SendAck(a)) => {
                    acks.lock().expect("lock").insert(key, (conv.clone(), a.seq));
                }
                other => panic!("send {key} failed: {other:?}"),
            }
        }
    }
}

async fn verify(broker: &Broker, convs: &[String], acks: &Acks) -> usize {
    let (mut c, _) = broker.raw_as("reader").await;
    let acked = acks.lock().expect("lock").clone();
    let mut entries = 0;
    for conv in convs {
        let log = c.log(conv).await;
        switchboard_tests::assert_gapless(log.iter().map(|e| e.0), 1);
        let mut at: HashMap<&str, u64> = HashMap::new();
        for (seq, key) in log.iter().skip(1) {
            assert!(at.insert(key, *seq).is_none(), "{key} stored twice in {conv}");
        }
        for (key, (c, seq)) in &acked {
            if c == conv {
                assert_eq!(at.get(key.as_str()), Some(seq), "acknowledged {key} lost or moved");
            }
        }
        entries += log.len();
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sync_durability_when_killed_repeatedly_during_sends_should_keep_every_acked_message()
{
    let mut broker =
        Broker::start_with(Options { durability: "sync".into(), ..Options::default() });
    let mut convs = Vec::new();
    for w in 0..WRITERS {
        let (mut c, _) = broker.raw_as(&format!("writer{w}")).await;
        convs.push(c.create_direct("reader").await);
    }
    let acks: Acks = Arc::default();
    let mut rng_state = 0x2545_f491_4f6c_dd1d_u64;
    for cycle in 0..KILLS {
        let mut writers = Vec::new();
        for (w, conv) in convs.iter().enumerate() {
            let (c, _) = broker.raw_as(&format!("writer{w}")).await;
            writers.push(tokio::spawn(write_until_killed(
                c,
                conv.clone(),
                format!("c{cycle}w{w}"),
                acks.clone(),
            )));
        }
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        tokio::time::sleep(Duration::from_millis(200 + rng_state % 600)).await;
        assert!(
            broker.is_running(),
            "broker died by itself (ack before fsync?):\n{}",
            broker.log()
        );
        broker.kill();
        for w in writers {
            w.await.expect("writer");
        }
        broker.restart();
        let entries = verify(&broker, &convs, &acks).await;
        assert!(entries > WRITERS * (cycle + 1), "writers made progress (cycle {cycle})");
    }
    // A retry of every acknowledged key after all the crashes is still a duplicate.
    let (mut c, _) = broker.raw_as("writer0").await;
    let acked = acks.lock().expect("lock").clone();
    for (key, (conv, seq)) in acked.iter().filter(|(k, _)| k.ends_with("w0-0")) {
        match c
            .request(client_frame::Kind::Send(switchboard_protocol::Send {
                conversation_id: conv.clone(),
                client_msg_id: key.clone(),
                content: Some(switchboard_protocol::Content::text("again")),
            }))
            .await
        {
            server_frame::Kind::SendAck(a) => assert!(a.duplicate && a.seq == *seq, "{key}: {a:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(acks.lock().expect("lock").len() > 100, "enough acknowledged sends to mean something");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_interval_durability_when_the_process_is_killed_should_keep_acked_messages() {
    // interval:<ms> acknowledges once the write reached the OS, so a process crash (unlike a
    // power loss) loses nothing acknowledged.
    let mut broker =
        Broker::start_with(Options { durability: "interval:1000".into(), ..Options::default() });
    let (mut c, _) = broker.raw_as("writer0").await;
    let conv = c.create_direct("reader").await;
    let acks: Acks = Arc::default();
    let writer = tokio::spawn(write_until_killed(c, conv.clone(), "iv".into(), acks.clone()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(broker.is_running());
    broker.kill();
    writer.await.expect("writer");
    broker.restart();
    let entries = verify(&broker, &[conv], &acks).await;
    assert!(acks.lock().expect("lock").len() > 10, "some sends were acknowledged");
    assert!(entries > acks.lock().expect("lock").len());
}
