//! Storage: one fjall `Database` with one keyspace per kind of record (see [`keys`]).
//!
//! Writes go only through the storage-writer thread ([`writer`]), which group-commits and
//! fsyncs according to the durability mode, then publishes a *durable snapshot*. All reads
//! made on behalf of clients ([`Reader`]) use that snapshot, so no client ever reads an entry
//! that a crash could still take back. Partition owners read the live database
//! ([`Storage::load_conversation`], [`Storage::dedupe`]) because they are the only writers of
//! their conversations and also know what is still in flight.
//!
//! Storage knows nothing of sessions or shards.

pub mod keys;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable, Snapshot};
use prost::Message as _;

use crate::config::{Durability, StorageConfig};

pub use writer::{CommitSink, Committed, WriteBatch, WriteOp, WriterHandle};

/// On-disk record types generated from `proto/storage.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod records {
    include!(concat!(env!("OUT_DIR"), "/switchboard.storage.v1.rs"));
}

pub use records::{StoredConversation, StoredEntry, StoredMember, StoredPush, StoredUser};

/// Encodes writes as a replicated entry's payload ([`records::ReplicatedOps`]).
#[must_use]
pub fn encode_ops(ops: &[WriteOp]) -> Vec<u8> {
    let ops = ops
        .iter()
        .map(|op| match op {
            WriteOp::Put(ks, key, value) => records::ReplicatedOp {
                kind: 1,
                keyspace: ks.code(),
                key: key.clone().into(),
                value: value.clone().into(),
                user: String::new(),
            },
            WriteOp::Delete(ks, key) => records::ReplicatedOp {
                kind: 2,
                keyspace: ks.code(),
                key: key.clone().into(),
                ..records::ReplicatedOp::default()
            },
            WriteOp::FeedAppend { user, event } => records::ReplicatedOp {
                kind: 3,
                value: event.encode_to_vec().into(),
                user: user.to_string(),
                ..records::ReplicatedOp::default()
            },
        })
        .collect();
    records::ReplicatedOps { ops }.encode_to_vec()
}

/// Decodes a replicated entry's payload.
///
/// # Errors
/// When the payload is damaged (a committed entry that does not decode).
pub fn decode_ops(payload: &[u8]) -> Result<Vec<WriteOp>> {
    let bad = |what: &str| corrupt("replicated entry", what);
    let record =
        records::ReplicatedOps::decode(payload).map_err(|e| corrupt("replicated entry", e))?;
    record
        .ops
        .into_iter()
        .map(|op| {
            let ks = || Ks::from_code(op.keyspace).ok_or_else(|| bad("unknown keyspace"));
            Ok(match op.kind {
                1 => WriteOp::Put(ks()?, op.key.to_vec(), op.value.to_vec()),
                2 => WriteOp::Delete(ks()?, op.key.to_vec()),
                3 => WriteOp::FeedAppend {
                    user: Arc::from(op.user.as_str()),
                    event: switchboard_protocol::FeedEvent::decode(op.value)
                        .map_err(|e| corrupt("replicated entry", e))?,
                },
                _ => return Err(bad("unknown operation")),
            })
        })
        .collect()
}

/// The storage layout version written to `meta/format_version`.
pub const FORMAT_VERSION: u64 = 1;

/// A storage failure. Write failures are fatal: the writer poisons the store and the broker
/// stops, never retrying an fsync.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// fjall reported an error.
    #[error("storage engine error: {0}")]
    Engine(Arc<fjall::Error>),
    /// A stored record does not decode.
    #[error("corrupt record in {keyspace}: {message}")]
    Corrupt {
        /// Which keyspace.
        keyspace: &'static str,
        /// What failed.
        message: String,
    },
    /// An earlier write failed; the store accepts no more writes.
    #[error("storage is poisoned by an earlier write failure")]
    Poisoned,
    /// Recovery found the store behind what had been fsynced: the journal lost acknowledged
    /// writes (damaged, or cut by a disk that lied about a flush).
    #[error(
        "the store lost acknowledged writes: recovery reached commit {recovered}, but commit \
         {fsynced} had been fsynced (the journal or its disk is damaged); restore the data \
         directory from a backup, or in a cluster remove this node's data and let it catch up"
    )]
    LostWrites {
        /// The last commit round the recovered store holds.
        recovered: u64,
        /// The last commit round recorded as fsynced.
        fsynced: u64,
    },
    /// The data directory was written by an incompatible version.
    #[error("data directory has format version {found}, this broker supports {FORMAT_VERSION}")]
    FormatVersion {
        /// The version found on disk.
        found: u64,
    },
}

impl From<fjall::Error> for StorageError {
    fn from(e: fjall::Error) -> Self {
        Self::Engine(Arc::new(e))
    }
}

impl StorageError {
    /// Whether stored data was found damaged (a block whose checksum fails, or a block or
    /// record that does not decode): no retry can help, and the data is not served.
    #[must_use]
    pub fn is_damage(&self) -> bool {
        use fjall::Error as F;
        use fjall::LsmError as L;
        match self {
            Self::Corrupt { .. } => true,
            Self::Engine(e) => matches!(
                &**e,
                F::Storage(
                    L::ChecksumMismatch { .. }
                        | L::Decompress(_)
                        | L::InvalidTag(_)
                        | L::InvalidTrailer
                        | L::InvalidHeader(_)
                        | L::Utf8(_)
                ) | F::Decompress(_)
                    | F::InvalidTrailer
                    | F::InvalidTag(_)
            ),
            _ => false,
        }
    }

    /// Logs a failed storage access for the operator (damage is counted in
    /// `switchboard_storage_damage_total`) and returns what the client is told: `INTERNAL`
    /// for damaged data (never served; retrying cannot help), `UNAVAILABLE` otherwise.
    #[must_use]
    pub fn report(&self) -> (switchboard_protocol::ErrorCode, &'static str) {
        if self.is_damage() {
            metrics::counter!(crate::metrics::STORAGE_DAMAGE).increment(1);
            tracing::error!(
                error = %self,
                "damaged data in the store: not served; restore the data directory from a \
                 backup, or in a cluster wipe this node's directory and let it catch up"
            );
            (switchboard_protocol::ErrorCode::Internal, "stored data is damaged")
        } else {
            tracing::error!(error = %self, "storage access failed");
            (switchboard_protocol::ErrorCode::Unavailable, "storage unavailable")
        }
    }
}

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

fn corrupt(keyspace: &'static str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt { keyspace, message: e.to_string() }
}

/// Identifies a keyspace in a [`WriteOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Ks {
    Messages,
    Dedupe,
    Conversations,
    Members,
    Memberships,
    Feeds,
    Users,
    Push,
    Meta,
}

/// Handles to every keyspace.
#[derive(Clone)]
#[allow(missing_docs)]
pub struct Keyspaces {
    pub messages: Keyspace,
    pub dedupe: Keyspace,
    pub conversations: Keyspace,
    pub members: Keyspace,
    pub memberships: Keyspace,
    pub feeds: Keyspace,
    pub users: Keyspace,
    pub push: Keyspace,
    pub meta: Keyspace,
}

impl Ks {
    const ALL: [Self; 9] = [
        Self::Messages,
        Self::Dedupe,
        Self::Conversations,
        Self::Members,
        Self::Memberships,
        Self::Feeds,
        Self::Users,
        Self::Push,
        Self::Meta,
    ];

    /// The keyspace's number in a replicated entry (`ReplicatedOp.keyspace`).
    fn code(self) -> u32 {
        Self::ALL.iter().position(|k| *k == self).map_or(0, |i| i as u32 + 1)
    }

    fn from_code(code: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?.checked_sub(1)?).copied()
    }
}

impl Keyspaces {
    fn get(&self, ks: Ks) -> &Keyspace {
        match ks {
            Ks::Messages => &self.messages,
            Ks::Dedupe => &self.dedupe,
            Ks::Conversations => &self.conversations,
            Ks::Members => &self.members,
            Ks::Memberships => &self.memberships,
            Ks::Feeds => &self.feeds,
            Ks::Users => &self.users,
            Ks::Push => &self.push,
            Ks::Meta => &self.meta,
        }
    }
}

/// The open store, shared by the writer thread and every shard.
pub struct Storage {
    db: Database,
    ks: Keyspaces,
    durability: Durability,
    /// The newest snapshot that holds only acknowledged-safe data.
    durable: RwLock<Snapshot>,
    /// Number of the last commit round covered by the durability mode's guarantee.
    durable_commit: AtomicU64,
    poisoned: AtomicBool,
    fatal: tokio::sync::Notify,
    /// The data directory (free space is measured on its file system).
    data_dir: std::path::PathBuf,
    /// The free-space floor in bytes; 0: unchecked.
    min_free: u64,
    /// Free space fell below the floor at the last check.
    full: AtomicBool,
    /// Why writes stopped (fail-stop), once they did.
    failure: std::sync::Mutex<Option<String>>,
    /// The last commit round the store held when it was opened.
    recovered_commit: u64,
    /// `FSYNCED_FILE`, open for overwriting in place (`sync` mode only).
    fsynced_file: Option<std::fs::File>,
    /// The newest commit round written to `FSYNCED_FILE` (reached the OS).
    fsynced_written: AtomicU64,
    /// The newest commit round whose record in `FSYNCED_FILE` was itself fsynced.
    fsynced_recorded: AtomicU64,
    /// A record write failed (warned once).
    fsynced_write_failed: AtomicBool,
}

/// Meta key of the memtable size (MiB) the store's keyspaces were created with.
const MEMTABLE_KEY: &str = "memtable_mb";
/// Meta key of the last commit round's number (written with every round).
pub(crate) const LAST_COMMIT_KEY: &str = "last_commit";
/// File in the data directory holding the newest commit round known fsynced (`sync` mode).
pub const FSYNCED_FILE: &str = "fsynced-commit";

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("durability", &self.durability).finish_non_exhaustive()
    }
}

/// What an owner needs to take over a conversation.
#[derive(Debug)]
pub struct LoadedConversation {
    /// The conversation row.
    pub record: StoredConversation,
    /// Current members.
    pub members: Vec<(String, StoredMember)>,
    /// The newest entry: (seq, timestamp, ordinal); `None` if the log is empty.
    pub head: Option<(u64, u64, u64)>,
}

impl Storage {
    /// Opens (or creates) the database in `cfg.data_dir` and checks its format version.
    ///
    /// # Errors
    /// When the database cannot be opened or has an unsupported format.
    pub fn open(cfg: &StorageConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| StorageError::from(fjall::Error::from(e)))?;
        let db =
            database(&cfg.data_dir.join("db"), cfg.cache_mb << 20, Some(cfg.max_journal_mb << 20))?;
        let memtable = cfg.memtable_mb << 20;
        let open = |name: &str| {
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(memtable))
        };
        let ks = Keyspaces {
            messages: open("messages")?,
            dedupe: open("dedupe")?,
            conversations: open("conversations")?,
            members: open("members")?,
            memberships: open("memberships")?,
            feeds: open("feeds")?,
            users: open("users")?,
            push: open("push")?,
            meta: open("meta")?,
        };
        // Every commit round records its number in the same atomic batch; `FSYNCED_FILE`
        // records the newest one that was fsynced, before its acks go out. A store that
        // recovers to an earlier round lost acknowledged writes: say so instead of serving
        // what is left.
        let recovered = match ks.meta.get(LAST_COMMIT_KEY)? {
            Some(v) => keys::trailing_u64(&v).ok_or_else(|| corrupt("meta", LAST_COMMIT_KEY))?,
            None => 0,
        };
        let fsynced = std::fs::read_to_string(cfg.data_dir.join(FSYNCED_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if recovered < fsynced {
            return Err(StorageError::LostWrites { recovered, fsynced });
        }
        match ks.meta.get("format_version")? {
            None => {
                ks.meta.insert("format_version", FORMAT_VERSION.to_be_bytes().to_vec())?;
                ks.meta.insert(MEMTABLE_KEY, cfg.memtable_mb.to_be_bytes().to_vec())?;
                db.persist(fjall::PersistMode::SyncAll)?;
            }
            Some(v) => {
                let found =
                    keys::trailing_u64(&v).ok_or_else(|| corrupt("meta", "format_version"))?;
                if found != FORMAT_VERSION {
                    return Err(StorageError::FormatVersion { found });
                }
                // fjall keeps a keyspace's memtable size from its creation: say so when the
                // configuration asks for another (stores from before the key: fjall's 64).
                let created = ks.meta.get(MEMTABLE_KEY)?.and_then(|v| keys::trailing_u64(&v));
                let created = created.unwrap_or(64);
                if created != cfg.memtable_mb {
                    tracing::warn!(
                        configured = cfg.memtable_mb,
                        in_effect = created,
                        "storage.memtable_mb applies when a data directory is created; this \
                         store keeps the size it was created with"
                    );
                }
            }
        }
        let fsynced_file = match cfg.durability {
            Durability::Sync => Some(open_fsynced_file(&cfg.data_dir).map_err(|e| {
                let path = cfg.data_dir.join(FSYNCED_FILE);
                let e = std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
                StorageError::from(fjall::Error::from(e))
            })?),
            _ => None,
        };
        lower_background_priority();
        let durable = RwLock::new(db.snapshot());
        Ok(Arc::new(Self {
            db,
            ks,
            durability: cfg.durability,
            durable,
            durable_commit: AtomicU64::new(recovered),
            recovered_commit: recovered,
            fsynced_file,
            fsynced_written: AtomicU64::new(fsynced),
            fsynced_recorded: AtomicU64::new(fsynced),
            fsynced_write_failed: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            fatal: tokio::sync::Notify::new(),
            data_dir: cfg.data_dir.clone(),
            min_free: cfg.min_free_mb << 20,
            full: AtomicBool::new(false),
            failure: std::sync::Mutex::new(None),
        }))
    }

    /// Bytes available to the broker on the data directory's file system (`statvfs`).
    ///
    /// # Errors
    /// When `statvfs` fails.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.data_dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Bytes the store takes on disk (journal and tables), when fjall can tell.
    #[must_use]
    pub fn disk_space(&self) -> Option<u64> {
        self.db.disk_space().ok()
    }

    /// Measures free space against `storage.min_free_mb` and remembers whether it is below;
    /// returns the free bytes. A failed measurement keeps the previous verdict.
    pub fn check_space(&self) -> Option<u64> {
        let free = match self.free_bytes() {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.data_dir.display(), "statvfs failed");
                return None;
            }
        };
        let full = self.min_free > 0 && free < self.min_free;
        if self.full.swap(full, Ordering::AcqRel) != full {
            if full {
                tracing::error!(
                    free,
                    floor = self.min_free,
                    "disk nearly full: refusing writes (storage.min_free_mb)"
                );
            } else {
                tracing::warn!(
                    free,
                    floor = self.min_free,
                    "disk space back above the floor: accepting writes"
                );
            }
        }
        Some(free)
    }

    /// Whether free space was below the floor at the last check: client writes are refused.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// The configured durability mode.
    #[must_use]
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The last commit round that the durability guarantee covers (fsynced in `sync` mode).
    #[must_use]
    pub fn durable_watermark(&self) -> u64 {
        self.durable_commit.load(Ordering::Acquire)
    }

    /// The last commit round the store held when it was opened (the writer continues from it).
    #[must_use]
    pub fn recovered_commit(&self) -> u64 {
        self.recovered_commit
    }

    /// Records commit round `n`, just fsynced, in `FSYNCED_FILE` (`sync` mode): one in-place
    /// overwrite of a single sector, which reaches the OS before the round's acks go out, so
    /// the record survives a process crash at once and a power cut once `sync_fsynced_record`
    /// ran (every second). The record never runs ahead of the journal: it is written after
    /// the round's fsync returned.
    pub(crate) fn record_fsynced(&self, n: u64) {
        use std::os::unix::fs::FileExt as _;
        let Some(file) = &self.fsynced_file else { return };
        match file.write_all_at(&fsynced_record(n), 0) {
            Ok(()) => self.fsynced_written.store(n, Ordering::Release),
            Err(e) => {
                if !self.fsynced_write_failed.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, "cannot record the fsynced commit");
                }
            }
        }
    }

    /// Fsyncs `FSYNCED_FILE` when its record moved. Called every second and at shutdown; a
    /// power cut between two calls leaves an older record, never a newer one than the journal.
    ///
    /// # Errors
    /// When the file cannot be synced.
    pub fn sync_fsynced_record(&self) -> std::io::Result<()> {
        let Some(file) = &self.fsynced_file else { return Ok(()) };
        let n = self.fsynced_written.load(Ordering::Acquire);
        if n <= self.fsynced_recorded.load(Ordering::Acquire) {
            return Ok(());
        }
        file.sync_data()?;
        self.fsynced_recorded.store(n, Ordering::Release);
        Ok(())
    }

    /// Whether a write failure stopped the store.
    #[must_use]
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Resolves once a fatal write failure happened.
    pub async fn fatal(&self) {
        if self.is_poisoned() {
            return;
        }
        self.fatal.notified().await;
    }

    /// Stops every further write for good (fail-stop): a failed write or fsync leaves the
    /// journal's state unknown, so nothing after it may be acknowledged, and retrying the fsync
    /// could report success for data the kernel already dropped. The first reason is kept.
    fn poison(&self, why: &str) {
        {
            let mut failure =
                self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if failure.is_none() {
                *failure = Some(why.to_owned());
            }
        }
        self.poisoned.store(true, Ordering::Release);
        self.fatal.notify_waiters();
    }

    /// Why writes stopped, once they did.
    #[must_use]
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A reader over the latest durable snapshot.
    #[must_use]
    pub fn reader(self: &Arc<Self>) -> Reader {
        let snap = self.durable.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        Reader { snap, ks: self.ks.clone() }
    }

    fn publish_snapshot(&self) {
        let snap = self.db.snapshot();
        *self.durable.write().unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
    }

    /// Loads a conversation's state from the live database (owner use only).
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn load_conversation(
        &self,
        partition: u16,
        conversation: &str,
    ) -> Result<Option<LoadedConversation>> {
        let Some(raw) = self.ks.conversations.get(keys::conversation_key(conversation))? else {
            return Ok(None);
        };
        let record = StoredConversation::decode(&*raw).map_err(|e| corrupt("conversations", e))?;
        let prefix = keys::member_prefix(conversation);
        let mut members = Vec::new();
        for kv in self.ks.members.prefix(&prefix) {
            let (k, v) = kv.into_inner()?;
            let user = keys::suffix_str(&k, &prefix).ok_or_else(|| corrupt("members", "key"))?;
            let m = StoredMember::decode(&*v).map_err(|e| corrupt("members", e))?;
            members.push((user.to_owned(), m));
        }
        let head = match self
            .ks
            .messages
            .prefix(keys::message_prefix(partition, conversation))
            .next_back()
        {
            None => None,
            Some(kv) => {
                let (k, v) = kv.into_inner()?;
                let seq = keys::trailing_u64(&k).ok_or_else(|| corrupt("messages", "key"))?;
                let entry = StoredEntry::decode(&*v).map_err(|e| corrupt("messages", e))?;
                let msg = switchboard_protocol::Message::decode(entry.message)
                    .map_err(|e| corrupt("messages", e))?;
                Some((seq, msg.timestamp_ms, entry.ordinal))
            }
        };
        Ok(Some(LoadedConversation { record, members, head }))
    }

    /// The last applied replicated log index of every partition that has one (cluster mode).
    ///
    /// # Errors
    /// On an engine error or a damaged record.
    pub fn applied(&self) -> Result<std::collections::HashMap<u16, u64>> {
        let mut out = std::collections::HashMap::new();
        for kv in self.ks.meta.prefix(keys::APPLIED_PREFIX) {
            let (k, v) = kv.into_inner()?;
            let p = k
                .get(keys::APPLIED_PREFIX.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u16::from_be_bytes)
                .ok_or_else(|| corrupt("meta", "applied key"))?;
            let index = keys::trailing_u64(&v).ok_or_else(|| corrupt("meta", "applied index"))?;
            out.insert(p, index);
        }
        Ok(out)
    }

    /// Looks up an idempotency key in the live database: `(seq, timestamp_ms)`.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn dedupe(
        &self,
        conversation: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<(u64, u64)>> {
        let Some(v) = self.ks.dedupe.get(keys::dedupe_key(conversation, sender, client_msg_id))?
        else {
            return Ok(None);
        };
        decode_dedupe(&v).map(Some)
    }
}

/// Value of a `dedupe` row: seq and timestamp, both u64 BE.
#[must_use]
pub fn encode_dedupe(seq: u64, timestamp_ms: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(&timestamp_ms.to_be_bytes());
    v
}

fn decode_dedupe(v: &[u8]) -> Result<(u64, u64)> {
    let seq = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    let ts = v.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    seq.zip(ts).ok_or_else(|| corrupt("dedupe", "short value"))
}

/// Read access to the latest durable snapshot. Blocking: call from `spawn_blocking`.
pub struct Reader {
    snap: Snapshot,
    ks: Keyspaces,
}

impl Reader {
    /// A conversation row.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn conversation(&self, conversation: &str) -> Result<Option<StoredConversation>> {
        self.snap
            .get(&self.ks.conversations, keys::conversation_key(conversation))?
            .map(|v| StoredConversation::decode(&*v).map_err(|e| corrupt("conversations", e)))
            .transpose()
    }

    /// One member row.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn member(&self, conversation: &str, user: &str) -> Result<Option<StoredMember>> {
        self.snap
            .get(&self.ks.members, keys::member_key(conversation, user))?
            .map(|v| StoredMember::decode(&*v).map_err(|e| corrupt("members", e)))
            .transpose()
    }

    /// Members with user id > `after`, at most `limit`, ascending.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn members(
        &self,
        conversation: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, StoredMember)>> {
        let prefix = keys::member_prefix(conversation);
        let mut out = Vec::new();
        for kv in self.snap.range(&self.ks.members, after_key(&prefix, after)..prefix_end(&prefix))
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv.into_inner()?;
            let user = keys::suffix_str(&k, &prefix).ok_or_else(|| corrupt("members", "key"))?;
            out.push((
                user.to_owned(),
                StoredMember::decode(&*v).map_err(|e| corrupt("members", e))?,
            ));
        }
        Ok(out)
    }

    /// Conversation ids of `user` with id > `after`, at most `limit`, ascending.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn memberships(&self, user: &str, after: &str, limit: usize) -> Result<Vec<String>> {
        let prefix = keys::membership_prefix(user);
        let mut out = Vec::new();
        for kv in
            self.snap.range(&self.ks.memberships, after_key(&prefix, after)..prefix_end(&prefix))
        {
            if out.len() >= limit {
                break;
            }
            let k = kv.key()?;
            let conv =
                keys::suffix_str(&k, &prefix).ok_or_else(|| corrupt("memberships", "key"))?;
            out.push(conv.to_owned());
        }
        Ok(out)
    }

    /// How many conversations `user` belongs to, counting up to `cap`.
    ///
    /// # Errors
    /// On an engine error.
    pub fn count_memberships(&self, user: &str, cap: usize) -> Result<usize> {
        let mut n = 0;
        for kv in self.snap.prefix(&self.ks.memberships, keys::membership_prefix(user)).take(cap) {
            kv.key()?;
            n += 1;
        }
        Ok(n)
    }

    /// A partition's last applied replicated log index (cluster mode; 0 when none).
    ///
    /// # Errors
    /// On an engine error or a damaged record.
    pub fn applied_index(&self, partition: u16) -> Result<u64> {
        match self.snap.get(&self.ks.meta, keys::applied_key(partition))? {
            None => Ok(0),
            Some(v) => keys::trailing_u64(&v).ok_or_else(|| corrupt("meta", "applied index")),
        }
    }

    /// The newest seq of each conversation of `partition` with id > `after` (by key order),
    /// at most `limit`: one seek per conversation, not a scan of its entries.
    ///
    /// # Errors
    /// On an engine error or a damaged key.
    pub fn heads(&self, partition: u16, after: &str, limit: usize) -> Result<Vec<(String, u64)>> {
        let part = partition.to_be_bytes();
        let end = prefix_end(&part);
        let mut from = if after.is_empty() {
            part.to_vec()
        } else {
            prefix_end(&keys::message_prefix(partition, after))
        };
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(kv) = self.snap.range(&self.ks.messages, from.clone()..end.clone()).next()
            else {
                break;
            };
            let key = kv.key()?;
            let len = usize::from(*key.get(2).ok_or_else(|| corrupt("messages", "key"))?);
            let conversation = key
                .get(3..3 + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| corrupt("messages", "key"))?
                .to_owned();
            let prefix = keys::message_prefix(partition, &conversation);
            let last = self.snap.prefix(&self.ks.messages, &prefix).next_back();
            if let Some(kv) = last {
                let seq =
                    keys::trailing_u64(&kv.key()?).ok_or_else(|| corrupt("messages", "key"))?;
                out.push((conversation, seq));
            }
            from = prefix_end(&prefix);
        }
        Ok(out)
    }

    /// Encoded entries with `after < seq <= to`, ascending, up to about `max_bytes` (at least
    /// one).
    ///
    /// # Errors
    /// On an engine error or a damaged key.
    pub fn raw_entries(
        &self,
        partition: u16,
        conversation: &str,
        after: u64,
        to: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let lo = keys::message_key(partition, conversation, after.saturating_add(1));
        let hi = keys::message_key(partition, conversation, to.saturating_add(1));
        let mut out = Vec::new();
        let mut bytes = 0;
        for kv in self.snap.range(&self.ks.messages, lo..hi) {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = kv.into_inner()?;
            let seq = keys::trailing_u64(&k).ok_or_else(|| corrupt("messages", "key"))?;
            bytes += v.len();
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    /// The newest entry of a conversation: (seq, entry).
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn head(&self, partition: u16, conversation: &str) -> Result<Option<(u64, StoredEntry)>> {
        match self
            .snap
            .prefix(&self.ks.messages, keys::message_prefix(partition, conversation))
            .next_back()
        {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv.into_inner()?;
                let seq = keys::trailing_u64(&k).ok_or_else(|| corrupt("messages", "key"))?;
                Ok(Some((seq, StoredEntry::decode(&*v).map_err(|e| corrupt("messages", e))?)))
            }
        }
    }

    /// One entry by seq.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn entry(
        &self,
        partition: u16,
        conversation: &str,
        seq: u64,
    ) -> Result<Option<StoredEntry>> {
        self.snap
            .get(&self.ks.messages, keys::message_key(partition, conversation, seq))?
            .map(|v| StoredEntry::decode(&*v).map_err(|e| corrupt("messages", e)))
            .transpose()
    }

    /// Entries with `from <= seq < to`, ascending, or descending when `reverse`.
    pub fn entries(
        &self,
        partition: u16,
        conversation: &str,
        from: u64,
        to: u64,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(u64, StoredEntry)>> + use<> {
        let lo = keys::message_key(partition, conversation, from);
        let hi = keys::message_key(partition, conversation, to);
        let iter = self.snap.range(&self.ks.messages, lo..hi);
        let iter: Box<dyn Iterator<Item = fjall::Guard>> =
            if reverse { Box::new(iter.rev()) } else { Box::new(iter) };
        iter.map(|kv| {
            let (k, v) = kv.into_inner()?;
            let seq = keys::trailing_u64(&k).ok_or_else(|| corrupt("messages", "key"))?;
            Ok((seq, StoredEntry::decode(&*v).map_err(|e| corrupt("messages", e))?))
        })
    }

    /// Feed events of `user` with user_seq > `after`, at most `limit`, ascending.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn feed(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<switchboard_protocol::FeedEvent>> {
        let lo = keys::feed_key(user, after.saturating_add(1));
        let hi = prefix_end(&keys::feed_prefix(user));
        let mut out = Vec::new();
        for kv in self.snap.range(&self.ks.feeds, lo..hi).take(limit) {
            let v = kv.value()?;
            out.push(
                switchboard_protocol::FeedEvent::decode(&*v).map_err(|e| corrupt("feeds", e))?,
            );
        }
        Ok(out)
    }

    /// When `user` was last online, if ever recorded.
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn last_seen(&self, user: &str) -> Result<Option<u64>> {
        self.snap
            .get(&self.ks.users, keys::user_key(user))?
            .map(|v| {
                StoredUser::decode(&*v).map(|u| u.last_seen_ms).map_err(|e| corrupt("users", e))
            })
            .transpose()
    }

    /// The direct-conversation peers of `user` (from the `dm:` ids in the membership index).
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn direct_peers(&self, user: &str, limit: usize) -> Result<Vec<String>> {
        let prefix = keys::membership_prefix(user);
        let mut lo = prefix.clone();
        lo.extend_from_slice(switchboard_protocol::validate::DIRECT_PREFIX.as_bytes());
        let hi = prefix_end(&lo);
        let mut out = Vec::new();
        for kv in self.snap.range(&self.ks.memberships, lo..hi).take(limit) {
            let k = kv.key()?;
            let conv =
                keys::suffix_str(&k, &prefix).ok_or_else(|| corrupt("memberships", "key"))?;
            let peer = conv
                .strip_prefix(switchboard_protocol::validate::DIRECT_PREFIX)
                .and_then(|pair| pair.split(':').find(|p| *p != user).or(Some(user)));
            if let Some(peer) = peer {
                out.push(peer.to_owned());
            }
        }
        Ok(out)
    }

    /// Every pending push notification: (user, conversation, record).
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn pending_pushes(&self) -> Result<Vec<(String, String, StoredPush)>> {
        let mut out = Vec::new();
        for kv in self.snap.iter(&self.ks.push) {
            let (k, v) = kv.into_inner()?;
            let (user, conv, _) = keys::split_push_key(&k).ok_or_else(|| corrupt("push", "key"))?;
            out.push((
                user.to_owned(),
                conv.to_owned(),
                StoredPush::decode(&*v).map_err(|e| corrupt("push", e))?,
            ));
        }
        Ok(out)
    }

    /// The newest user_seq of `user`'s feed (0 when empty).
    ///
    /// # Errors
    /// On an engine error or a corrupt record.
    pub fn feed_head(&self, user: &str) -> Result<u64> {
        match self.snap.prefix(&self.ks.feeds, keys::feed_prefix(user)).next_back() {
            None => Ok(0),
            Some(kv) => keys::trailing_u64(&kv.key()?).ok_or_else(|| corrupt("feeds", "key")),
        }
    }
}

/// The smallest key strictly greater than every key `prefix ‖ after` … i.e. the start of the
/// range of keys after the id `after` (or the prefix itself when `after` is empty).
fn after_key(prefix: &[u8], after: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    if !after.is_empty() {
        k.extend_from_slice(after.as_bytes());
        k.push(0);
    }
    k
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last < u8::MAX {
            k.push(last + 1);
            return k;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

/// Nice value of the store's background threads (memtable flush, compaction).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the CPU priority of fjall's worker threads (named `fjall:worker`, started when the
/// database opens) to [`BACKGROUND_NICE`], as RocksDB does for its compaction pool: a flush
/// or compaction that runs for milliseconds then yields the core to a shard or the storage
/// writer that has a message to route, instead of taking a full scheduler slice ahead of it.
/// Background work still gets its share when the core is busy (weight 110 against 1024), and
/// all of it when the core is idle. Linux only (nice is per thread there); elsewhere a no-op.
/// Opens (or creates) a fjall database the way every broker database is opened: the caller
/// owns fsync (`persist`), with a block cache of `cache_bytes`. Used for messages, the cluster
/// control plane and the replication engine.
///
/// # Errors
/// When the database cannot be opened.
pub fn database(
    path: &std::path::Path,
    cache_bytes: u64,
    max_journal_bytes: Option<u64>,
) -> std::result::Result<Database, fjall::Error> {
    let mut builder = Database::builder(path).manual_journal_persist(true).cache_size(cache_bytes);
    if let Some(bytes) = max_journal_bytes {
        // fjall asserts at least 64 MiB; the configuration is validated to that.
        builder = builder.max_journaling_size(bytes.max(64 << 20));
    }
    builder.open()
}

/// The record of commit round `n`: fixed width (20 digits and a newline), so each overwrite
/// covers the last; built on the stack (one per fsync round).
fn fsynced_record(n: u64) -> [u8; 21] {
    use std::io::Write as _;
    let mut record = [0; 21];
    // Every u64 fits in 20 digits: the write cannot fall short.
    let _ = writeln!(&mut record[..], "{n:020}");
    record
}

/// Opens (creating) `FSYNCED_FILE` for in-place overwrites, and makes it and its directory
/// entry durable (every start: a first start may have died before doing so).
fn open_fsynced_file(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(FSYNCED_FILE))?;
    if file.metadata()?.len() == 0 {
        file.write_all_at(&fsynced_record(0), 0)?;
    }
    file.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(file)
}

fn lower_background_priority() {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("fjall") {
                continue;
            }
            let tid = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
            let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) else { continue };
            if let Err(e) = rustix::process::setpriority_process(Some(pid), BACKGROUND_NICE) {
                tracing::debug!(?tid, error = %e, "could not lower a background thread's priority");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_commit_round_its_record_should_be_fixed_width_decimal() {
        assert_eq!(&fsynced_record(42), b"00000000000000000042\n");
        assert_eq!(&fsynced_record(u64::MAX), b"18446744073709551615\n");
        let parsed = std::str::from_utf8(&fsynced_record(7)).unwrap().trim().parse::<u64>();
        assert_eq!(parsed, Ok(7));
    }

    #[test]
    fn given_writes_should_survive_the_replicated_payload_and_damage_should_be_an_error() {
        let event = switchboard_protocol::FeedEvent {
            conversation_id: "c".into(),
            conversation_seq: 4,
            ..Default::default()
        };
        let ops = vec![
            WriteOp::Put(Ks::Messages, b"k1".to_vec(), b"v1".to_vec()),
            WriteOp::Delete(Ks::Memberships, b"k2".to_vec()),
            WriteOp::Put(Ks::Meta, b"k3".to_vec(), Vec::new()),
            WriteOp::FeedAppend { user: Arc::from("alice"), event: event.clone() },
        ];
        let back = decode_ops(&encode_ops(&ops)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{ops:?}"));
        let unknown = records::ReplicatedOps {
            ops: vec![records::ReplicatedOp { kind: 1, keyspace: 42, ..Default::default() }],
        };
        assert!(decode_ops(&unknown.encode_to_vec()).is_err());
        assert!(decode_ops(&[0xff, 0xff, 0xff]).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn given_an_opened_store_should_run_fjall_workers_at_background_priority() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig {
            data_dir: dir.path().to_owned(),
            durability: crate::config::Durability::Buffered,
            cache_mb: 8,
            ..StorageConfig::default()
        };
        let _storage = Storage::open(&cfg).unwrap();
        // Other tests open stores concurrently: some thread may be between its spawn and its
        // own store's renice, so look for at least one lowered worker, not all of them.
        let lowered = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .unwrap_or_default()
                    .starts_with("fjall")
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .filter_map(|stat| {
                // Field 19 is the nice value; fields are counted after the ")" of field 2.
                let rest = &stat[stat.rfind(')')? + 2..];
                rest.split(' ').nth(16)?.parse::<i32>().ok()
            })
            .filter(|nice| *nice == BACKGROUND_NICE)
            .count();
        assert!(lowered > 0, "no fjall worker runs at nice {BACKGROUND_NICE}");
    }

    #[test]
    fn given_prefix_end_should_bound_all_keys_with_prefix() {
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
        assert_eq!(prefix_end(&[1, 255]), vec![2]);
        assert!(
            keys::member_key("c", "zzz").as_slice()
                < prefix_end(&keys::member_prefix("c")).as_slice()
        );
    }

    #[test]
    fn given_after_key_should_skip_exactly_the_given_id() {
        let p = keys::member_prefix("c");
        let k_bob = keys::member_key("c", "bob");
        let k_bobby = keys::member_key("c", "bobby");
        let start = after_key(&p, "bob");
        assert!(k_bob < start);
        assert!(k_bobby > start);
    }
}
