//! Inputs shared by the benchmarks: golden frames and records of the hot paths, and fixtures
//! that set up the broker's own state (a shard hosting sessions, a home shard, the storage
//! writer) so a benchmark calls the broker's real code.
//!
//! The benchmarks themselves (`benches/`) are thin; the measured code lives in the crates.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use switchboard_broker::config::{Config, Durability, StorageConfig};
use switchboard_broker::shard::home::Home;
use switchboard_broker::shard::local::{self, LocalSession};
use switchboard_broker::shard::mailbox::{Membership, Outgoing};
use switchboard_broker::shard::outbound::Outbound;
use switchboard_broker::shard::{
    HomeMsg, LocalMsg, MAILBOX_CAPACITY, SessionRef, Shard, ShardMsg, ShardSetup, partition,
};
use switchboard_broker::storage::{
    self, CommitSink, Committed, Ks, Storage, StoredEntry, WriteBatch, WriteOp, WriterHandle, keys,
};
use switchboard_protocol::{
    ClientFrame, Content, Encoded, Message, SharedFrame, client_frame, encode_message_push,
};
use tokio_util::sync::CancellationToken;

/// The conversation every golden message belongs to.
pub const CONVERSATION: &str = "g:0123456789abcdef0123456789abcdef";

/// Body size of the stored records in the storage benchmarks (bytes of text).
pub const RECORD_BODY: usize = 200;

/// A chat message of `body` bytes as the broker stores and delivers it.
#[must_use]
pub fn message(body: usize, seq: u64) -> Message {
    Message {
        conversation_id: CONVERSATION.into(),
        seq,
        sender: "alice@example".into(),
        timestamp_ms: 1_795_000_000_000 + seq,
        client_msg_id: format!("{seq:032x}"),
        content: Some(Content::text("x".repeat(body))),
        system: None,
    }
}

/// A `Send` request with a `body`-byte text.
#[must_use]
pub fn send_frame(body: usize, request_id: u64) -> ClientFrame {
    ClientFrame::request(
        request_id,
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: CONVERSATION.into(),
            client_msg_id: format!("{request_id:032x}"),
            content: Some(Content::text("x".repeat(body))),
        }),
    )
}

/// `n` encoded `Send` frames back to back, as a client pipelines them.
#[must_use]
pub fn pipelined_sends(n: usize, body: usize) -> Bytes {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend_from_slice(&switchboard_protocol::encode_frame(&send_frame(body, i as u64 + 1)));
    }
    Bytes::from(out)
}

/// The shared push frame of a message, encoded the way the partition owner does it once per
/// committed entry (encode the `Message`, wrap it as a `ServerFrame` push).
#[must_use]
pub fn delivery_frame(body: usize, seq: u64) -> SharedFrame {
    Encoded::new(encode_message_push(&message(body, seq).encode_to_vec()))
}

// ---------------------------------------------------------------------------------------------
// Storage: records, the broker's writer thread, and fjall alone.
// ---------------------------------------------------------------------------------------------

/// One `messages` row as the partition owner writes it: the key (partition, conversation, seq)
/// and the `StoredEntry` holding the encoded message ([`RECORD_BODY`]-byte text).
#[must_use]
pub fn message_record(seq: u64) -> (Vec<u8>, Vec<u8>) {
    let value = StoredEntry {
        epoch: 1,
        ordinal: seq,
        message: message(RECORD_BODY, seq).encode_to_vec().into(),
    }
    .encode_to_vec();
    (keys::message_key(partition(CONVERSATION), CONVERSATION, seq), value)
}

/// `n` consecutive records starting after `*seq` (which advances).
#[must_use]
pub fn message_records(seq: &mut u64, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|_| {
            *seq += 1;
            message_record(*seq)
        })
        .collect()
}

/// The records as writer operations.
#[must_use]
pub fn message_ops(records: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<WriteOp> {
    records.into_iter().map(|(k, v)| WriteOp::Put(Ks::Messages, k, v)).collect()
}

/// Criterion settings shared by the benchmarks: 1 s of warm-up, 3 s of measurement.
#[must_use]
pub fn quick() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// The broker's group-commit writer thread over a store; stopped (everything flushed) on drop.
pub struct WriterFixture {
    writer: WriterHandle,
    join: Option<std::thread::JoinHandle<()>>,
    sink: CommitSink,
    rx: mpsc::Receiver<Committed>,
    token: u64,
    /// The store's temporary directory, when this fixture made it (dropped last).
    _dir: Option<tempfile::TempDir>,
}

impl WriterFixture {
    /// Opens a store with `durability` in a temporary directory (on the same file system as
    /// `/tmp`) and starts the writer.
    ///
    /// # Panics
    /// When the store cannot be opened (a benchmark cannot go on).
    #[must_use]
    pub fn open(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fixture = Self::on(storage_in(&dir, durability));
        fixture._dir = Some(dir);
        fixture
    }

    /// Starts the writer over `storage`.
    ///
    /// # Panics
    /// When the thread cannot be spawned.
    #[must_use]
    pub fn on(storage: Arc<Storage>) -> Self {
        let (writer, join) = storage::writer::spawn(storage).expect("writer thread");
        let (tx, rx) = mpsc::channel::<Committed>();
        let sink: CommitSink = Arc::new(move |c| {
            let _ = tx.send(c);
        });
        Self { writer, join: Some(join), sink, rx, token: 0, _dir: None }
    }

    /// A handle for submitting batches (what a shard holds).
    #[must_use]
    pub fn handle(&self) -> WriterHandle {
        self.writer.clone()
    }

    /// Submits one batch and waits until the writer reports it committed (and, in `sync`
    /// mode, fsynced). With one batch in flight, each batch is its own commit round.
    ///
    /// # Panics
    /// When the writer fails.
    pub fn commit(&mut self, ops: Vec<WriteOp>) {
        self.token += 1;
        let batch = WriteBatch { token: self.token, ops, sink: self.sink.clone(), fsync: true };
        assert!(self.writer.submit(batch).is_ok(), "writer gone");
        let c = self.rx.recv().expect("commit outcome");
        assert_eq!(c.token, self.token);
        c.result.expect("commit");
    }
}

impl Drop for WriterFixture {
    fn drop(&mut self) {
        self.writer.shutdown();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// fjall alone, opened like the broker opens it (`manual_journal_persist`, 64 MiB cache, a
/// `messages` keyspace with default options): the baseline for the broker's durable writes.
pub struct FjallBaseline {
    db: fjall::Database,
    messages: fjall::Keyspace,
    _dir: tempfile::TempDir,
}

impl FjallBaseline {
    /// Opens an empty database in a temporary directory.
    ///
    /// # Panics
    /// When the database cannot be opened.
    #[must_use]
    pub fn open() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = fjall::Database::builder(dir.path().join("db"))
            .manual_journal_persist(true)
            .cache_size(64 << 20)
            .open()
            .expect("open fjall");
        let messages =
            db.keyspace("messages", fjall::KeyspaceCreateOptions::default).expect("keyspace");
        Self { db, messages, _dir: dir }
    }

    /// Writes `records` as one atomic batch, then one `persist(SyncData)` (fdatasync of the
    /// journal): what the broker's writer does per round in `sync` mode, without the thread.
    ///
    /// # Panics
    /// On a write or fsync failure.
    pub fn commit_sync(&self, records: Vec<(Vec<u8>, Vec<u8>)>) {
        let mut batch = self.db.batch();
        for (k, v) in records {
            batch.insert(&self.messages, k, v);
        }
        batch.commit().expect("commit");
        self.db.persist(fjall::PersistMode::SyncData).expect("fsync");
    }
}

fn storage_in(dir: &tempfile::TempDir, durability: Durability) -> Arc<Storage> {
    Storage::open(&StorageConfig {
        data_dir: dir.path().to_owned(),
        durability,
        cache_mb: 64,
        ..StorageConfig::default()
    })
    .expect("open storage")
}

// ---------------------------------------------------------------------------------------------
// Fan-out: one shard hosting many sessions of one conversation.
// ---------------------------------------------------------------------------------------------

/// A one-shard broker's shard hosting `n` sessions (one per user), every one of them an
/// active receiver of [`CONVERSATION`]: the state in which the owner's `Deliver` for a
/// committed message reaches the shard.
pub struct FanOut {
    shard: Rc<Shard>,
    sessions: Vec<Rc<LocalSession>>,
    conversation: Arc<str>,
    frame: SharedFrame,
    drained: RefCell<Vec<SharedFrame>>,
    _writer: WriterFixture,
    _mailbox: tokio::sync::mpsc::Receiver<ShardMsg>,
    _dir: tempfile::TempDir,
}

impl FanOut {
    /// Builds the shard and its sessions (outbound queues of the default size), and makes them
    /// receive the conversation through the shard's own subscription bookkeeping.
    ///
    /// # Panics
    /// When the store cannot be opened.
    #[must_use]
    pub fn new(n: usize, body: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = storage_in(&dir, Durability::Buffered);
        let writer = WriterFixture::on(storage.clone());
        let mut config = Config::default();
        config.auth.secret = Some("bench-secret-bench-secret-bench-secret".into());
        let auth = switchboard_broker::auth::Authenticator::from_config(&config.auth, dir.path())
            .expect("authenticator");
        let (tx, rx) = tokio::sync::mpsc::channel(MAILBOX_CAPACITY);
        let limiters = Arc::new(switchboard_broker::ratelimit::Limiters::new(&config.limits));
        let queue_bytes = config.limits.outbound_queue_bytes;
        let shard = Shard::new(ShardSetup {
            id: 0,
            config: Arc::new(config),
            storage,
            writer: writer.handle(),
            auth: Arc::new(auth),
            mailboxes: vec![tx],
            limiters,
            webhook: None,
            metrics: None,
            dev_minter: None,
            cluster: None,
        });
        let conversation: Arc<str> = Arc::from(CONVERSATION);
        let mut sessions = Vec::with_capacity(n);
        {
            let mut local = shard.local.borrow_mut();
            for i in 0..n {
                let id = shard.next_session_id();
                let out = Rc::new(Outbound::new(queue_bytes, CancellationToken::new()));
                let user: Arc<str> = Arc::from(format!("user{i:05}@example").as_str());
                let meta = switchboard_broker::shard::local::SessionMeta {
                    transport: switchboard_broker::metrics::Transport::Tcp,
                    peer: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                    client: String::new(),
                    connected_at_ms: 0,
                };
                let s = Rc::new(LocalSession::new(id, user, meta, out, CancellationToken::new()));
                local.insert(s.clone());
                local.add_pending(id, &conversation);
                sessions.push(s);
            }
        }
        // The owner's answer, as it arrives in its bundle: every session is a member.
        local::apply(
            &shard,
            LocalMsg::Subscribed {
                token: 0,
                sessions: sessions.iter().map(|s| s.id).collect(),
                conversations: vec![conversation.clone()],
                outcomes: vec![Membership::Member],
            },
        );
        Self {
            shard,
            sessions,
            conversation,
            frame: delivery_frame(body, 1),
            drained: RefCell::default(),
            _writer: writer,
            _mailbox: rx,
            _dir: dir,
        }
    }

    /// The owner's `Deliver` of one committed message to this shard: the shared frame goes to
    /// every active session's outbound queue. The sender is a session on another shard, so no
    /// session here is skipped.
    pub fn deliver(&self) {
        local::apply(
            &self.shard,
            LocalMsg::Deliver {
                conversation: self.conversation.clone(),
                frame: self.frame.clone(),
                skip: Some(SessionRef { shard: 1, id: 1 }),
                droppable: false,
            },
        );
    }

    /// Empties every outbound queue as the connections' writers do; returns the frames taken.
    pub fn drain(&self) -> usize {
        let mut drained = self.drained.borrow_mut();
        for s in &self.sessions {
            s.out.drain(64, &mut drained);
        }
        let n = drained.len();
        drained.clear();
        n
    }

    /// Messages pushed to sessions so far (the shard's `deliveries` counter).
    #[must_use]
    pub fn deliveries(&self) -> u64 {
        self.shard.stats.deliveries.get()
    }
}

// ---------------------------------------------------------------------------------------------
// Presence: the home shard's records.
// ---------------------------------------------------------------------------------------------

/// The home-shard role of a one-shard broker with `n` users, each with a direct conversation
/// with the next user (so going online or offline notifies two peers), none online.
pub struct PresenceFixture {
    home: RefCell<Home>,
    users: Vec<Arc<str>>,
    grace: Duration,
    _dir: tempfile::TempDir,
}

impl PresenceFixture {
    /// Builds the home role over a store holding the users' direct-conversation memberships.
    ///
    /// # Panics
    /// When the store cannot be written.
    #[must_use]
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = storage_in(&dir, Durability::Buffered);
        let users: Vec<Arc<str>> =
            (0..n).map(|i| Arc::from(format!("user{i:05}@example").as_str())).collect();
        {
            let mut ops = Vec::new();
            for (i, a) in users.iter().enumerate() {
                let b = &users[(i + 1) % n];
                let dm = switchboard_protocol::validate::direct_conversation_id(a, b);
                for user in [a, b] {
                    ops.push(WriteOp::Put(
                        Ks::Memberships,
                        keys::membership_key(user, &dm),
                        1u64.to_be_bytes().to_vec(),
                    ));
                }
            }
            WriterFixture::on(storage.clone()).commit(ops);
        }
        let config = Config::default();
        let grace = Duration::from_millis(config.presence.grace_ms);
        let home = Home::new(&config, storage, 1);
        Self { home: RefCell::new(home), users, grace, _dir: dir }
    }

    /// The users.
    #[must_use]
    pub fn users(&self) -> &[Arc<str>] {
        &self.users
    }

    fn session(i: usize) -> SessionRef {
        SessionRef { shard: 0, id: i as u64 + 1 }
    }

    /// `SessionUp` messages for every user's first session, as the accepting shard sends them.
    #[must_use]
    pub fn session_up_msgs(&self) -> Vec<HomeMsg> {
        self.users
            .iter()
            .enumerate()
            .map(|(i, user)| {
                let (ack, _) = tokio::sync::oneshot::channel();
                HomeMsg::SessionUp { user: user.clone(), session: Self::session(i), ack }
            })
            .collect()
    }

    /// `SessionDown` messages for every user's session.
    #[must_use]
    pub fn session_down_msgs(&self) -> Vec<HomeMsg> {
        self.users
            .iter()
            .enumerate()
            .map(|(i, user)| HomeMsg::SessionDown { user: user.clone(), session: Self::session(i) })
            .collect()
    }

    /// One batched lease renewal for every user (what a hosting shard sends every heartbeat
    /// interval).
    #[must_use]
    pub fn renew_msg(&self) -> HomeMsg {
        HomeMsg::Renew { users: self.users.clone() }
    }

    /// Hands `msgs` to the home role, as the shard's mailbox loop does; returns how many
    /// messages it produced for other shards or roles (presence pushes and peer notices).
    pub fn handle(&self, msgs: Vec<HomeMsg>) -> usize {
        let mut out = Outgoing::new(1);
        let mut home = self.home.borrow_mut();
        for msg in msgs {
            home.handle(msg, &mut out);
        }
        out.home.len() + out.local.iter().map(Vec::len).sum::<usize>()
    }

    /// The periodic tick once every grace period started so far has run out: users whose last
    /// session closed go offline (record, presence pushes, last-seen writes). Returns the
    /// number of storage writes produced.
    pub fn expire_grace(&self) -> usize {
        let mut out = Outgoing::new(1);
        let later = Instant::now() + self.grace + Duration::from_millis(1);
        let mut home = self.home.borrow_mut();
        let mut ops = home.tick(later, false, &mut out);
        ops.extend(home.flush_writes());
        ops.len()
    }

    /// Number of sessions the home role knows for `user`.
    #[must_use]
    pub fn session_count(&self, user: &str) -> usize {
        self.home.borrow().session_count(user)
    }
}
