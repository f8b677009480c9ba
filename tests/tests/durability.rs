//! Durability is proven, not assumed: a SIGKILL keeps the page cache, so only failpoints in
//! the storage writer (set at run time through the admin API of the test build) show that an
//! ack waits for its fsync and that a failed fsync stops the broker instead of being retried.

use std::time::Duration;

use switchboard_protocol::{ClientFrame, ErrorCode, client_frame, server_frame};
use switchboard_tests::{Broker, Options, RawConn, http_get, http_request_with};

const ADMIN_TOKEN: &str = "an-admin-token-of-32-characters!";

fn durable_broker() -> Broker {
    Broker::start_with(Options {
        durability: "sync".into(),
        ..Options::with_args(&["--set", &format!("http.admin_token={ADMIN_TOKEN}")])
    })
}

async fn failpoint(broker: &Broker, name: &str, actions: Option<&str>) {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let path = format!("/admin/failpoints/{name}");
    let (status, body) = match actions {
        Some(a) => {
            http_request_with(broker.http, "PUT", &path, &[("Authorization", &bearer)], a).await
        }
        None => {
            http_request_with(broker.http, "DELETE", &path, &[("Authorization", &bearer)], "").await
        }
    };
    assert_eq!(status, 200, "{body}");
}

fn send(id: u64, conv: &str, key: &str) -> ClientFrame {
    ClientFrame::request(
        id,
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: conv.into(),
            client_msg_id: key.into(),
            content: Some(switchboard_protocol::Content::text(key)),
        }),
    )
}

/// Pipelines `n` sends; their request ids.
async fn pipeline(c: &mut RawConn, conv: &str, prefix: &str, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = c.next_id();
        c.send(send(id, conv, &format!("{prefix}-{i}"))).await;
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn given_a_blocked_persist_should_acknowledge_nothing_until_it_is_lifted() {
    let broker = durable_broker();
    let (mut alice, _) = broker.raw_as("alice").await;
    let (mut carol, _) = broker.raw_as("carol").await;
    let a_conv = alice.create_direct("bob").await;
    let c_conv = carol.create_direct("dave").await;

    failpoint(&broker, "storage-persist", Some("pause")).await;
    let a_ids = pipeline(&mut alice, &a_conv, "a", 3).await;
    let c_ids = pipeline(&mut carol, &c_conv, "c", 3).await;
    // Nothing is acknowledged while the journal cannot be persisted, on any shard.
    for (c, ids) in [(&mut alice, &a_ids), (&mut carol, &c_ids)] {
        let quiet = tokio::time::Instant::now() + Duration::from_millis(1_500);
        while let Ok(Some(f)) = tokio::time::timeout_at(quiet, c.recv()).await {
            assert!(!ids.contains(&f.request_id), "an answer before its fsync: {f:?}");
            c.pushes.push(f);
        }
    }

    failpoint(&broker, "storage-persist", None).await;
    for (c, ids) in [(&mut alice, a_ids), (&mut carol, c_ids)] {
        let mut seqs = Vec::new();
        for id in ids {
            match c.reply_to(id).await {
                server_frame::Kind::SendAck(a) => seqs.push(a.seq),
                other => panic!("expected an ack once lifted, got {other:?}"),
            }
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "acks in send order: {seqs:?}");
    }
}

#[tokio::test]
async fn given_a_failed_fsync_should_refuse_the_batch_report_why_and_stop_without_retrying() {
    let mut broker = durable_broker();
    let (mut alice, _) = broker.raw_as("alice").await;
    let conv = alice.create_direct("bob").await;
    let ids = pipeline(&mut alice, &conv, "ok", 5).await;
    let mut acked = Vec::new();
    for id in ids {
        match alice.reply_to(id).await {
            server_frame::Kind::SendAck(a) => acked.push(a.seq),
            other => panic!("{other:?}"),
        }
    }

    // One fsync fails; later ones would succeed, so a retry would go unnoticed but for this.
    failpoint(&broker, "storage-fsync-error", Some("1*return")).await;
    for key in ["lost", "after-the-failure"] {
        let id = alice.next_id();
        alice.send(send(id, &conv, key)).await;
        match alice.reply_to(id).await {
            server_frame::Kind::Error(e) => assert_eq!(e.code, ErrorCode::Unavailable as i32),
            other => panic!("{key} was answered with {other:?} after a failed fsync"),
        }
    }
    // /readyz says why while the broker stops; the log too.
    let (status, body) = http_get(broker.http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("storage failed") && body.contains("injected fsync failure"), "{body}");
    let status = broker.wait_exit(Duration::from_secs(30)).await.expect("the broker stops");
    assert_eq!(status.code(), Some(3), "exit status of a storage failure");
    let log = broker.log();
    assert!(log.contains("fail-stop") && log.contains("injected fsync failure"), "{log}");

    // Restarted on a healthy disk: every acknowledged message is there once, in order.
    broker.restart();
    let (mut reader, _) = broker.raw_as("alice").await;
    let log = reader.log(&conv).await;
    for (seq, key) in acked.iter().zip((0..5).map(|i| format!("ok-{i}"))) {
        assert!(log.contains(&(*seq, key.clone())), "acknowledged {key} at {seq} in {log:?}");
    }
    assert!(
        !log.iter().any(|(_, k)| k == "after-the-failure"),
        "nothing was written after the failure: {log:?}"
    );
    let id = reader.next_id();
    reader.send(send(id, &conv, "after")).await;
    assert!(matches!(reader.reply_to(id).await, server_frame::Kind::SendAck(_)));
}

/// The newest journal file of the broker's store.
fn newest_journal(data: &std::path::Path) -> std::path::PathBuf {
    let db = data.join("db");
    std::fs::read_dir(&db)
        .expect("db dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| {
            p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .expect("a journal file")
}

/// Where the journal's written bytes end (the file is preallocated with zeros). It can
/// undercount by the zero bytes that happen to end the last entry (a checksum's high bytes).
fn written_end(journal: &std::path::Path) -> usize {
    let bytes = std::fs::read(journal).expect("journal");
    bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

async fn acked_sends(c: &mut RawConn, conv: &str, prefix: &str, n: usize) -> Vec<(u64, String)> {
    let ids = pipeline(c, conv, prefix, n).await;
    let mut acked = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        match c.reply_to(id).await {
            server_frame::Kind::SendAck(a) => acked.push((a.seq, format!("{prefix}-{i}"))),
            other => panic!("{other:?}"),
        }
    }
    acked
}

/// Ten acknowledged sends, then one of `marker` (its key and text); the broker is killed as
/// soon as that is acknowledged. The newest journal, its bytes and where `marker` last starts.
async fn killed_after_marker(
    broker: &mut Broker,
    marker: &str,
) -> (std::path::PathBuf, Vec<u8>, usize) {
    let (mut c, _) = broker.raw_as("alice").await;
    let conv = c.create_direct("bob").await;
    acked_sends(&mut c, &conv, "acked", 10).await;
    let id = c.next_id();
    c.send(send(id, &conv, marker)).await;
    assert!(matches!(c.reply_to(id).await, server_frame::Kind::SendAck(_)));
    let journal = newest_journal(&broker.data_dir());
    broker.kill();
    let bytes = std::fs::read(&journal).expect("journal");
    let at = bytes
        .windows(marker.len())
        .rposition(|w| w == marker.as_bytes())
        .expect("the message's text is in the journal");
    (journal, bytes, at)
}

#[tokio::test]
async fn given_a_journal_torn_past_its_last_fsync_should_recover_every_acknowledged_message() {
    let mut broker = durable_broker();
    let (mut c, _) = broker.raw_as("alice").await;
    let conv = c.create_direct("bob").await;
    let acked = acked_sends(&mut c, &conv, "acked", 40).await;
    // The sender's coalesced receipt is written within a second or so: let it land first (the
    // journal's end stays put for 1.2 s), so the next fsync is the one of the large sends below.
    let journal = newest_journal(&broker.data_dir());
    let settled = tokio::time::Instant::now() + Duration::from_secs(15);
    let (mut synced, mut still) = (written_end(&journal), 0);
    while still < 4 {
        assert!(tokio::time::Instant::now() < settled, "the journal never stopped growing");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let end = written_end(&journal);
        still = if end == synced { still + 1 } else { 0 };
        synced = end;
    }

    // With fsync blocked, large unacknowledged sends reach the file (past the journal's
    // buffer) but not the disk: the torn tail a power cut leaves.
    failpoint(&broker, "storage-persist", Some("pause")).await;
    for i in 0..4 {
        let id = c.next_id();
        let big = switchboard_protocol::Content::text("t".repeat(30_000));
        c.send(ClientFrame::request(
            id,
            client_frame::Kind::Send(switchboard_protocol::Send {
                conversation_id: conv.clone(),
                client_msg_id: format!("torn-{i}"),
                content: Some(big),
            }),
        ))
        .await;
    }
    let written = tokio::time::Instant::now() + Duration::from_secs(10);
    while written_end(&journal) <= synced + 1_000 {
        assert!(tokio::time::Instant::now() < written, "unsynced bytes never reached the file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.kill();
    let end = written_end(&journal);
    // Cut inside the unsynced bytes (never before the end of the last fsynced entry).
    let cut = synced + 16 + (end - synced - 16) / 3;
    let file = std::fs::OpenOptions::new().write(true).open(&journal).expect("open journal");
    file.set_len(cut as u64).expect("truncate");
    drop(file);

    broker.restart();
    let (mut reader, _) = broker.raw_as("alice").await;
    let log = reader.log(&conv).await;
    switchboard_tests::assert_gapless(log.iter().map(|e| e.0), 1);
    for entry in &acked {
        assert!(log.contains(entry), "acknowledged {entry:?} lost: {log:?}");
    }
    let id = reader.next_id();
    reader.send(send(id, &conv, "after-recovery")).await;
    assert!(matches!(reader.reply_to(id).await, server_frame::Kind::SendAck(_)));
}

#[tokio::test]
async fn given_a_flipped_bit_in_fsynced_journal_data_should_refuse_to_serve_and_say_why() {
    let mut broker = durable_broker();
    let (journal, mut bytes, at) = killed_after_marker(&mut broker, "needle-in-the-journal").await;

    // Flip one bit inside the acknowledged message's text.
    bytes[at + 3] ^= 0x01;
    std::fs::write(&journal, &bytes).expect("write journal");

    // The broker does not start on damaged acknowledged data (it would serve or drop it), and
    // says why.
    let started = broker.try_restart();
    assert!(started.is_err(), "started on a damaged journal");
    let log = broker.log();
    assert!(log.to_lowercase().contains("checksum"), "{log}");
}

#[tokio::test]
async fn given_a_journal_cut_inside_its_last_acknowledged_write_should_refuse_to_start_and_say_so()
{
    let mut broker = durable_broker();
    // Killed at once: the fsynced commit is on record before its ack leaves.
    let (journal, _, at) = killed_after_marker(&mut broker, "the-last-acknowledged-message").await;

    // The journal loses the acknowledged message's write (a damaged entry header reads like
    // the end of the journal to recovery, which cuts it there): a cut, without a trace.
    let file = std::fs::OpenOptions::new().write(true).open(&journal).expect("open journal");
    file.set_len(at as u64).expect("truncate");
    drop(file);

    let started = broker.try_restart();
    assert!(started.is_err(), "served a store that lost an acknowledged message");
    let log = broker.log();
    assert!(log.contains("lost acknowledged writes"), "{log}");
}

/// Files under `dir` (recursively) other than journals that hold `needle`.
fn tables_holding(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        if path.is_dir() {
            found.extend(tables_holding(&path, needle));
        } else if path.extension().is_none_or(|x| x != "jnl")
            && std::fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn given_a_flipped_bit_in_a_table_block_should_refuse_to_serve_it_and_say_why() {
    // Small memtables: a few hundred KiB of messages are flushed to a table file.
    let mut broker = Broker::start_with(Options {
        durability: "sync".into(),
        ..Options::with_args(&["--set", "storage.memtable_mb=1"])
    });
    let (mut c, _) = broker.raw_as("alice").await;
    let conv = c.create_direct("bob").await;
    let marker = "needle-in-a-table-block";
    let id = c.next_id();
    c.send(send(id, &conv, marker)).await;
    assert!(matches!(c.reply_to(id).await, server_frame::Kind::SendAck(_)));
    let db = broker.data_dir().join("db");
    let flushed = tokio::time::Instant::now() + Duration::from_secs(30);
    let table = loop {
        let mut ids = Vec::new();
        for i in 0..10 {
            let id = c.next_id();
            c.send(ClientFrame::request(
                id,
                client_frame::Kind::Send(switchboard_protocol::Send {
                    conversation_id: conv.clone(),
                    client_msg_id: format!("filler-{id}-{i}"),
                    content: Some(switchboard_protocol::Content::text(
                        format!("{id}").repeat(6_000),
                    )),
                }),
            ))
            .await;
            ids.push(id);
        }
        c.replies(&ids).await;
        if let Some(table) = tables_holding(&db, marker.as_bytes()).pop() {
            break table;
        }
        assert!(tokio::time::Instant::now() < flushed, "no table file holds the message");
    };
    // The flush is done once the keyspace's version (`current`, naming the manifest that
    // lists its tables) is newer than the table: killed earlier, recovery would drop the
    // table and replay the journal instead.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let current =
        table.parent().and_then(std::path::Path::parent).expect("keyspace").join("current");
    while modified(&current) < modified(&table) {
        assert!(tokio::time::Instant::now() < flushed, "the flush never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill();

    let mut bytes = std::fs::read(&table).expect("table");
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the message is in the table");
    bytes[at + 3] ^= 0x01;
    std::fs::write(&table, &bytes).expect("write table");

    // The broker starts (table blocks are checked when read); the damaged message is never
    // served: its page is refused with a typed error, and the broker says why.
    broker.restart();
    let (mut reader, _) = broker.raw_as("alice").await;
    let reply = reader
        .request(client_frame::Kind::History(switchboard_protocol::History {
            conversation_id: conv.clone(),
            limit: 5,
            anchor: Some(switchboard_protocol::history::Anchor::AfterSeq(0)),
        }))
        .await;
    match reply {
        server_frame::Kind::Error(e) => {
            assert_eq!(e.code, ErrorCode::Internal as i32, "{e:?}");
            assert_eq!(e.message, "stored data is damaged");
        }
        other => panic!("served a page from a damaged block: {other:?}"),
    }
    let log = broker.log();
    assert!(log.contains("damaged data in the store") && log.contains("ChecksumMismatch"), "{log}");
    let (_, metrics) = http_get(broker.http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchboard_storage_damage_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
