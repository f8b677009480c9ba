//! The storage-writer thread: every fjall write in the broker happens here.
//!
//! Group commit: the thread blocks for one batch, drains every other batch already queued, and
//! commits them as one atomic fjall batch. Then, by durability mode:
//! - `sync`: `persist(SyncData)`: one fsync covers every batch committed before it;
//! - `interval:<ms>`: `persist(Buffer)` (the OS has it), and `SyncData` once per interval;
//! - `buffered`: nothing.
//!
//! Only then does it publish the new durable snapshot and complete the batches, in order,
//! through each batch's [`CommitSink`]. While one round is being fsynced, new batches queue up
//! and form the next round, so the batch size grows with load by itself.
//!
//! A failed commit or fsync poisons the store: the round and every later batch fail, and the
//! broker stops. An fsync is never retried (its failure may have dropped dirty pages).
//!
//! The writer also sequences user feeds: a [`WriteOp::FeedAppend`] gets the next `user_seq`
//! of its user here, inside the same atomic batch as the change that caused it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fjall::PersistMode;
use prost::Message as _;
use switchboard_protocol::FeedEvent;

use super::{Ks, Storage, StorageError, keys};
use crate::config::Durability;

/// One write.
#[derive(Debug)]
pub enum WriteOp {
    /// Insert or replace a value.
    Put(Ks, Vec<u8>, Vec<u8>),
    /// Delete a key.
    Delete(Ks, Vec<u8>),
    /// Append an event to a user's feed; the writer assigns `user_seq`.
    FeedAppend {
        /// Whose feed.
        user: Arc<str>,
        /// The event (its `user_seq` is overwritten).
        event: FeedEvent,
    },
}

/// Receives the outcome of a batch, on the writer thread. Must not block for long.
pub type CommitSink = Arc<dyn Fn(Committed) + Send + Sync>;

/// A batch of writes that commit atomically.
pub struct WriteBatch {
    /// Caller's identifier, returned in [`Committed`].
    pub token: u64,
    /// The writes, applied in order.
    pub ops: Vec<WriteOp>,
    /// Where the outcome goes.
    pub sink: CommitSink,
    /// Whether the durability mode applies. `false` for writes already durable elsewhere: a
    /// cluster's committed entries, fsynced in a majority's replication logs (a crash loses at
    /// most an unsynced tail of them here, with the applied index in the same batch, and they
    /// are applied again from the log). A round with no such batch skips the fsync.
    pub fsync: bool,
}

impl std::fmt::Debug for WriteBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatch")
            .field("token", &self.token)
            .field("ops", &self.ops.len())
            .finish()
    }
}

/// The outcome of a [`WriteBatch`].
#[derive(Debug)]
pub struct Committed {
    /// The batch's token.
    pub token: u64,
    /// The commit round that carried it; in `sync` mode, covered by
    /// [`Storage::durable_watermark`] by the time this is delivered.
    pub commit_no: u64,
    /// The `user_seq` assigned to each `FeedAppend`, in order; or the failure.
    pub result: Result<Vec<u64>, StorageError>,
}

enum Msg {
    Batch(WriteBatch),
    Shutdown(mpsc::Sender<()>),
}

/// Submits batches to the writer thread. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterHandle")
    }
}

impl WriterHandle {
    /// Queues a batch.
    ///
    /// # Errors
    /// Gives the batch back when the writer thread is gone.
    pub fn submit(&self, batch: WriteBatch) -> Result<(), WriteBatch> {
        match self.tx.send(Msg::Batch(batch)) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Msg::Batch(b))) => Err(b),
            Err(mpsc::SendError(Msg::Shutdown(_))) => Ok(()),
        }
    }

    /// Flushes and fsyncs everything queued so far, then stops the thread.
    pub fn shutdown(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// Largest amount of queued batches merged into one round (by op count).
const MAX_ROUND_OPS: usize = 64 * 1024;

/// Starts the writer thread.
///
/// # Errors
/// When the thread cannot be spawned.
pub fn spawn(
    storage: Arc<Storage>,
) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let join = std::thread::Builder::new()
        .name("sb-storage-writer".into())
        .spawn(move || Writer::new(storage).run(&rx))?;
    Ok((WriterHandle { tx }, join))
}

struct Writer {
    storage: Arc<Storage>,
    feed_heads: HashMap<Arc<str>, u64>,
    commit_no: u64,
    last_sync: Instant,
    unsynced: bool,
    round_seconds: metrics::Histogram,
    fsync_seconds: metrics::Histogram,
    batch_ops: metrics::Histogram,
    batch_batches: metrics::Histogram,
}

impl Writer {
    fn new(storage: Arc<Storage>) -> Self {
        let commit_no = storage.recovered_commit();
        Self {
            storage,
            feed_heads: HashMap::new(),
            commit_no,
            last_sync: Instant::now(),
            unsynced: false,
            round_seconds: metrics::histogram!(crate::metrics::STORAGE_ROUND_SECONDS),
            fsync_seconds: metrics::histogram!(crate::metrics::FSYNC_SECONDS),
            batch_ops: metrics::histogram!(crate::metrics::BATCH_OPS),
            batch_batches: metrics::histogram!(crate::metrics::BATCH_BATCHES),
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        loop {
            let first = match self.storage.durability {
                Durability::Interval(iv) if self.unsynced => {
                    match rx.recv_timeout(iv.saturating_sub(self.last_sync.elapsed())) {
                        Ok(m) => Some(m),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
            };
            let mut round = Vec::new();
            let mut ops = 0;
            let mut shutdown = None;
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Batch(b) => {
                        ops += b.ops.len();
                        round.push(b);
                    }
                    Msg::Shutdown(ack) => {
                        shutdown = Some(ack);
                        break;
                    }
                }
                if ops < MAX_ROUND_OPS {
                    next = rx.try_recv().ok();
                }
            }
            if !round.is_empty() {
                self.commit_round(round);
            }
            if let Durability::Interval(iv) = self.storage.durability
                && self.unsynced
                && self.last_sync.elapsed() >= iv
            {
                self.sync(PersistMode::SyncData);
            }
            if let Some(ack) = shutdown {
                // Drain whatever was queued behind the shutdown request, then fsync everything.
                let rest: Vec<WriteBatch> = rx
                    .try_iter()
                    .filter_map(|m| match m {
                        Msg::Batch(b) => Some(b),
                        Msg::Shutdown(_) => None,
                    })
                    .collect();
                if !rest.is_empty() {
                    self.commit_round(rest);
                }
                self.sync(PersistMode::SyncAll);
                let _ = ack.send(());
                break;
            }
        }
    }

    fn sync(&mut self, mode: PersistMode) {
        if self.storage.is_poisoned() {
            return;
        }
        match self.persist(mode) {
            Ok(()) => {
                self.last_sync = Instant::now();
                self.unsynced = false;
            }
            Err(e) => {
                tracing::error!(error = %e, "fsync failed; stopping writes (fail-stop)");
                self.storage.poison(&format!("fsync failed: {e}"));
            }
        }
    }

    /// Persists the journal in `mode`, timing the fsyncs.
    ///
    /// Failpoints (test builds): `storage-persist` (e.g. `pause`: every fsync, so every ack,
    /// waits until it is lifted, with the bytes already written to the file) and `storage-fsync-error` (`return`: an fsync fails).
    fn persist(&self, mode: PersistMode) -> fjall::Result<()> {
        #[cfg(feature = "failpoints")]
        if mode != PersistMode::Buffer {
            // The batch's bytes reach the OS first, as they do while a slow fsync runs: a
            // crash now leaves them written but not durable (a torn tail).
            let _ = self.storage.db.persist(PersistMode::Buffer);
            fail::fail_point!("storage-persist");
        }
        #[cfg(feature = "failpoints")]
        fail::fail_point!("storage-fsync-error", mode != PersistMode::Buffer, |_| {
            Err(fjall::Error::from(std::io::Error::other("injected fsync failure")))
        });
        if mode == PersistMode::Buffer {
            return self.storage.db.persist(mode);
        }
        let started = Instant::now();
        let result = self.storage.db.persist(mode);
        self.fsync_seconds.record(started.elapsed().as_secs_f64());
        result
    }

    fn commit_round(&mut self, mut round: Vec<WriteBatch>) {
        let started = Instant::now();
        #[allow(clippy::cast_precision_loss)]
        {
            self.batch_batches.record(round.len() as f64);
            self.batch_ops.record(round.iter().map(|b| b.ops.len()).sum::<usize>() as f64);
        }
        let outcome = if self.storage.is_poisoned() {
            Err(StorageError::Poisoned)
        } else {
            self.write(&mut round)
        };
        let fsync = round.iter().any(|b| b.fsync);
        let outcome = outcome.and_then(|seqs| {
            let persisted = match self.storage.durability {
                Durability::Sync if fsync => self.persist(PersistMode::SyncData),
                Durability::Sync => self.persist(PersistMode::Buffer),
                Durability::Interval(_) => {
                    self.unsynced = true;
                    self.persist(PersistMode::Buffer)
                }
                Durability::Buffered => Ok(()),
            };
            persisted.map(|()| seqs).map_err(StorageError::from)
        });
        self.round_seconds.record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(seqs) => {
                self.commit_no += 1;
                if fsync || self.storage.durability != Durability::Sync {
                    self.storage
                        .durable_commit
                        .store(self.commit_no, std::sync::atomic::Ordering::Release);
                }
                if fsync {
                    // Before the acks: a journal that later loses this round is caught.
                    self.storage.record_fsynced(self.commit_no);
                }
                self.storage.publish_snapshot();
                for (batch, seqs) in round.into_iter().zip(seqs) {
                    (batch.sink)(Committed {
                        token: batch.token,
                        commit_no: self.commit_no,
                        result: Ok(seqs),
                    });
                }
            }
            Err(e) => {
                if !matches!(e, StorageError::Poisoned) {
                    tracing::error!(error = %e, "write or fsync failed; the batch is not acknowledged and writes stop (fail-stop)");
                }
                // Feed heads may have advanced for writes that did not land.
                self.feed_heads.clear();
                self.storage.poison(&format!("write or fsync failed: {e}"));
                for batch in round {
                    (batch.sink)(Committed {
                        token: batch.token,
                        commit_no: 0,
                        result: Err(e.clone()),
                    });
                }
            }
        }
    }

    /// Applies every batch of the round in one atomic fjall batch, moving each operation's
    /// bytes into it (no copy). Returns, per batch, the user_seqs assigned to its feed appends.
    fn write(&mut self, round: &mut [WriteBatch]) -> Result<Vec<Vec<u64>>, StorageError> {
        // Bound the cache between rounds only: within a round it also holds appends that are
        // not committed yet, which a re-read from storage would miss.
        if self.feed_heads.len() > 1 << 20 {
            self.feed_heads.clear();
        }
        let storage = self.storage.clone();
        let ks = &storage.ks;
        let mut fb = storage.db.batch();
        let mut all_seqs = Vec::with_capacity(round.len());
        for batch in round {
            let mut seqs = Vec::new();
            for op in batch.ops.drain(..) {
                match op {
                    WriteOp::Put(k, key, value) => fb.insert(ks.get(k), key, value),
                    WriteOp::Delete(k, key) => fb.remove(ks.get(k), key),
                    WriteOp::FeedAppend { user, mut event } => {
                        let seq = self.next_feed_seq(&user)?;
                        event.user_seq = seq;
                        fb.insert(&ks.feeds, keys::feed_key(&user, seq), event.encode_to_vec());
                        seqs.push(seq);
                    }
                }
            }
            all_seqs.push(seqs);
        }
        // The round's number, in the same atomic batch: recovery can tell how far it got.
        fb.insert(&ks.meta, super::LAST_COMMIT_KEY, (self.commit_no + 1).to_be_bytes().to_vec());
        fb.commit()?;
        Ok(all_seqs)
    }

    fn next_feed_seq(&mut self, user: &Arc<str>) -> Result<u64, StorageError> {
        if let Some(seq) = self.feed_heads.get_mut(user) {
            *seq += 1;
            return Ok(*seq);
        }
        let head = match self.storage.ks.feeds.prefix(keys::feed_prefix(user)).next_back() {
            None => 0,
            Some(kv) => {
                keys::trailing_u64(&kv.key()?).ok_or_else(|| super::corrupt("feeds", "key"))?
            }
        };
        self.feed_heads.insert(user.clone(), head + 1);
        Ok(head + 1)
    }
}

/// Time budget after which [`WriterHandle::shutdown`] callers should stop waiting.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use std::sync::Mutex;

    fn config(dir: &std::path::Path, durability: Durability) -> StorageConfig {
        StorageConfig {
            data_dir: dir.to_owned(),
            durability,
            cache_mb: 8,
            ..StorageConfig::default()
        }
    }

    fn open(dir: &std::path::Path, durability: Durability) -> Arc<Storage> {
        Storage::open(&config(dir, durability)).unwrap()
    }

    fn collect() -> (CommitSink, Arc<Mutex<Vec<Committed>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        (Arc::new(move |c| o.lock().unwrap().push(c)), out)
    }

    fn feed_event(conv: &str) -> FeedEvent {
        FeedEvent { conversation_id: conv.into(), ..Default::default() }
    }

    #[test]
    fn given_batches_when_committed_should_complete_in_order_and_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path(), Durability::Sync);
        let (writer, join) = spawn(storage.clone()).unwrap();
        let (sink, out) = collect();
        for token in 0..10u64 {
            let _ = writer.submit(WriteBatch {
                token,
                ops: vec![WriteOp::Put(Ks::Users, format!("u{token}").into_bytes(), vec![1])],
                sink: sink.clone(),
                fsync: true,
            });
        }
        writer.shutdown();
        join.join().unwrap();
        let out = out.lock().unwrap();
        assert_eq!(out.iter().map(|c| c.token).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
        for c in out.iter() {
            assert!(c.result.is_ok());
            assert!(c.commit_no <= storage.durable_watermark());
        }
        assert!(storage.ks.users.get("u9").unwrap().is_some());
    }

    #[test]
    fn given_feed_appends_should_assign_gapless_user_seqs_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..2u64 {
            let storage = open(dir.path(), Durability::Buffered);
            let (writer, join) = spawn(storage.clone()).unwrap();
            let (sink, out) = collect();
            let user: Arc<str> = Arc::from("alice");
            let _ = writer.submit(WriteBatch {
                token: 1,
                ops: vec![
                    WriteOp::FeedAppend { user: user.clone(), event: feed_event("a") },
                    WriteOp::FeedAppend { user: Arc::from("bob"), event: feed_event("a") },
                    WriteOp::FeedAppend { user: user.clone(), event: feed_event("b") },
                ],
                sink,
                fsync: true,
            });
            writer.shutdown();
            join.join().unwrap();
            let seqs = out.lock().unwrap().pop().unwrap().result.unwrap();
            let base = round * 2;
            assert_eq!(seqs, vec![base + 1, round + 1, base + 2]);
            let reader = storage.reader();
            assert_eq!(reader.feed_head("alice").unwrap(), base + 2);
            let feed = reader.feed("alice", base, 10).unwrap();
            assert_eq!(
                feed.iter().map(|e| e.user_seq).collect::<Vec<_>>(),
                vec![base + 1, base + 2]
            );
        }
    }

    #[test]
    fn given_a_round_of_writes_durable_elsewhere_should_not_count_as_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path(), Durability::Sync);
        let (writer, join) = spawn(storage.clone()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink: CommitSink = Arc::new(move |c| {
            let _ = tx.send(c);
        });
        let batch = |token, fsync| WriteBatch {
            token,
            ops: vec![WriteOp::Put(Ks::Users, vec![1], vec![2])],
            sink: sink.clone(),
            fsync,
        };
        let _ = writer.submit(batch(1, false));
        let first = rx.recv().unwrap();
        assert!(first.result.is_ok());
        assert!(storage.durable_watermark() < first.commit_no, "not fsynced, not durable");
        assert!(storage.ks.users.get([1]).unwrap().is_some(), "but written");
        let _ = writer.submit(batch(2, true));
        let second = rx.recv().unwrap();
        assert!(storage.durable_watermark() >= second.commit_no);
        writer.shutdown();
        join.join().unwrap();
    }

    #[test]
    fn given_sync_mode_snapshot_should_only_show_committed_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open(dir.path(), Durability::Sync);
        let before = storage.reader();
        let (writer, join) = spawn(storage.clone()).unwrap();
        let (sink, _out) = collect();
        let _ = writer.submit(WriteBatch {
            token: 1,
            ops: vec![WriteOp::Put(Ks::Conversations, b"c".to_vec(), Vec::new())],
            sink,
            fsync: true,
        });
        writer.shutdown();
        join.join().unwrap();
        assert!(before.conversation("c").unwrap().is_none(), "old snapshot is stable");
        assert!(storage.reader().conversation("c").unwrap().is_some());
    }

    #[test]
    fn given_a_recorded_fsynced_commit_ahead_of_the_store_should_refuse_to_open_as_lost_writes() {
        let dir = tempfile::tempdir().unwrap();
        let n = {
            let storage = open(dir.path(), Durability::Sync);
            let (writer, join) = spawn(storage.clone()).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let sink: CommitSink = Arc::new(move |c| {
                let _ = tx.send(c);
            });
            for token in 1..=3 {
                let ops = vec![WriteOp::Put(Ks::Users, vec![token], vec![1])];
                let _ = writer.submit(WriteBatch {
                    token: token.into(),
                    ops,
                    sink: sink.clone(),
                    fsync: true,
                });
                assert!(rx.recv().unwrap().result.is_ok());
            }
            // Every acknowledged fsync round is on record before its ack.
            let recorded =
                std::fs::read_to_string(dir.path().join(crate::storage::FSYNCED_FILE)).unwrap();
            assert_eq!(recorded.trim().parse::<u64>().unwrap(), storage.durable_watermark());
            storage.sync_fsynced_record().unwrap();
            writer.shutdown();
            join.join().unwrap();
            storage.durable_watermark()
        };
        assert!(n >= 3);
        // Reopened as it was: the writer goes on from the recovered round.
        let storage = open(dir.path(), Durability::Sync);
        assert_eq!(storage.recovered_commit(), n);
        drop(storage);
        // A record ahead of what recovery finds: acknowledged writes were lost.
        std::fs::write(dir.path().join(crate::storage::FSYNCED_FILE), format!("{}\n", n + 1))
            .unwrap();
        let err = Storage::open(&config(dir.path(), Durability::Sync)).unwrap_err();
        assert!(
            matches!(err, StorageError::LostWrites { recovered, fsynced } if recovered == n && fsynced == n + 1),
            "{err}"
        );
    }
}
