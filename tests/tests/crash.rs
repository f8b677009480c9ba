//! Crash safety: SIGKILL during acknowledged sends loses nothing that was acknowledged.
//!
//! The broker runs with `--durability sync` and is killed at random moments (every 0.5-3 s
//! for a minute, at least 20 times, some while it recovers) while four writers pipeline sends. After every restart each conversation's log must hold every
//! acknowledged message exactly once at its acknowledged seq, with gapless seqs. The test
//! broker is a debug build, so every ack also asserts that the fsynced watermark covers it; a
//! violation aborts the broker, which this test notices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_protocol::{ClientFrame, client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn};

const WRITERS: usize = 4;
/// Kills the loop makes at least, however long it takes.
const KILLS: usize = 20;
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

/// A small xorshift generator: the loop's timings vary per run, and the seed is printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from))
    }
}

/// Everything a reader sees of the conversations: each log, in order.
async fn state(broker: &Broker, convs: &[String]) -> Vec<Vec<(u64, String)>> {
    let (mut c, _) = broker.raw_as("reader").await;
    let mut all = Vec::new();
    for conv in convs {
        all.push(c.log(conv).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sync_durability_when_killed_repeatedly_during_sends_should_keep_every_acked_message()
{
    // SIGKILL every 0.5-3 s for a minute while writers pipeline acknowledged sends; one kill
    // in four lands while the broker is still starting (recovering its store). The journal is
    // kept small (64 MiB before memtables flush) so recovery replays little. A soak runs
    // longer: `SWITCHBOARD_SOAK_SECS=3600 cargo test -p switchboard-tests --test crash`.
    let soak = std::env::var("SWITCHBOARD_SOAK_SECS").ok().and_then(|s| s.parse().ok());
    let loop_for = Duration::from_secs(soak.unwrap_or(60));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill loop seed {seed}");
    let mut rng = Rng(seed);
    let mut broker = Broker::start_with(Options {
        durability: "sync".into(),
        ..Options::with_args(&["--set", "storage.max_journal_mb=64"])
    });
    let mut convs = Vec::new();
    for w in 0..WRITERS {
        let (mut c, _) = broker.raw_as(&format!("writer{w}")).await;
        convs.push(c.create_direct("reader").await);
    }
    let acks: Acks = Arc::default();
    let started = tokio::time::Instant::now();
    let (mut kills, mut during_recovery, mut cycle) = (0usize, 0usize, 0u64);
    while started.elapsed() < loop_for || kills < KILLS {
        cycle += 1;
        if rng.next().is_multiple_of(4) {
            // A crash while starting: anywhere from before the store is open to just after
            // the listeners bind.
            broker.start_and_kill_after(rng.millis(0, 150)).await;
            during_recovery += 1;
            kills += 1;
        }
        broker.restart();
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
        tokio::time::sleep(rng.millis(500, 3_000)).await;
        assert!(
            broker.is_running(),
            "broker died by itself (ack before fsync?):\n{}",
            broker.log()
        );
        broker.kill();
        kills += 1;
        for w in writers {
            w.await.expect("writer");
        }
        if cycle.is_multiple_of(8) {
            broker.restart();
            verify(&broker, &convs, &acks).await;
        }
    }
    eprintln!("{kills} kills ({during_recovery} while starting) in {:?}", started.elapsed());
    assert!(during_recovery > 0, "some kills hit a starting broker (seed {seed})");

    // The checker: every acknowledged message exactly once at its seq, gapless logs.
    broker.restart();
    let entries = verify(&broker, &convs, &acks).await;
    let acked = acks.lock().expect("lock").len();
    eprintln!("{acked} acknowledged messages, {entries} entries after the last recovery");
    assert!(acked > 500, "enough acknowledged sends to mean something: {acked}");
    assert!(entries > acked, "{entries} entries for {acked} acks");
    // Recovering twice gives the same state.
    let first = state(&broker, &convs).await;
    broker.kill();
    broker.restart();
    assert_eq!(state(&broker, &convs).await, first, "a second recovery changed the state");
    // A retry of acknowledged keys after all the crashes is still a duplicate.
    let (mut c, _) = broker.raw_as("writer0").await;
    let retries: Vec<(String, (String, u64))> = acks
        .lock()
        .expect("lock")
        .iter()
        .filter(|(k, _)| k.starts_with('c') && k.ends_with("w0-0"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(!retries.is_empty());
    for (key, (conv, seq)) in retries {
        match c
            .request(client_frame::Kind::Send(switchboard_protocol::Send {
                conversation_id: conv.clone(),
                client_msg_id: key.clone(),
                content: Some(switchboard_protocol::Content::text("again")),
            }))
            .await
        {
            server_frame::Kind::SendAck(a) => assert!(a.duplicate && a.seq == seq, "{key}: {a:?}"),
            other => panic!("{other:?}"),
        }
    }
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
