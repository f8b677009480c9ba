//! The control plane's Raft (openraft): its types, its durable storage in fjall, and its
//! network client.
//!
//! The log, the vote and the state machine live in their own fjall database
//! (`<data_dir>/control`), apart from the message store, so the control plane's fsyncs never
//! queue behind message group commits and vice versa. Every append and every vote is fsynced
//! before openraft is told it is durable; the state machine is written after each applied batch
//! and is rebuilt from the log (or the last snapshot) if a crash loses it.

// The storage traits return openraft's `StorageError`, which is large; the helpers return it
// too, so that `?` works in the trait methods.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftNetwork,
    RaftNetworkFactory, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::NodeId;
use super::control::{Applied, Command, Table};

openraft::declare_raft_types!(
    /// The control plane's Raft types: commands change the partition table; nodes are reached
    /// at their peer address.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = BasicNode,
);

/// The control plane's Raft instance.
pub type Raft = openraft::Raft<TypeConfig>;

fn io_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

/// The durable state of the control plane: its own fjall database.
#[derive(Clone)]
pub struct Store {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
}

impl Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";
const MACHINE: &str = "machine";
const SNAPSHOT: &str = "snapshot";

impl Store {
    /// Opens (or creates) `<data_dir>/control`.
    ///
    /// # Errors
    /// When the database cannot be opened.
    pub fn open(data_dir: &Path) -> Result<Self, fjall::Error> {
        let db = crate::storage::database(&data_dir.join("control"), 4 << 20, None)?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        Ok(Self { db, log, meta })
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(read_err),
        }
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError<NodeId>> {
        let v = serde_json::to_vec(value).map_err(io_err)?;
        self.meta.insert(key, v).map_err(io_err)
    }

    fn sync(&self) -> Result<(), StorageError<NodeId>> {
        self.db.persist(PersistMode::SyncData).map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for Store {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..end.to_be_bytes()) {
            let (_, v) = kv.into_inner().map_err(read_err)?;
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for Store {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get(PURGED)?;
        let last = match self.log.iter().next_back() {
            Some(kv) => {
                let (_, v) = kv.into_inner().map_err(read_err)?;
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put(VOTE, vote)?;
        self.sync()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.put(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.db.batch();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(io_err)?;
            batch.insert(&self.log, e.log_id.index.to_be_bytes(), v);
        }
        batch.commit().map_err(io_err)?;
        let result = self.db.persist(PersistMode::SyncData).map_err(std::io::Error::other);
        let failed = result.as_ref().err().map(ToString::to_string);
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(io_err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = self.db.batch();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            batch.remove(&self.log, kv.key().map_err(read_err)?);
        }
        batch.commit().map_err(io_err)?;
        self.sync()
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put(PURGED, &log_id)?;
        let mut batch = self.db.batch();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            batch.remove(&self.log, kv.key().map_err(read_err)?);
        }
        batch.commit().map_err(io_err)?;
        self.sync()
    }
}

/// What the state machine holds: the partition table plus Raft's own bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// The last applied log entry.
    pub last_applied: Option<LogId<NodeId>>,
    /// The last applied membership.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// The partition table.
    pub table: Table,
}

/// The state machine: applies commands to the table and publishes every new state.
pub struct StateMachine {
    store: Store,
    machine: Machine,
    snapshot: CurrentSnapshot,
    published: watch::Sender<Arc<Machine>>,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine").field("last_applied", &self.machine.last_applied).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

impl StateMachine {
    /// Loads the last persisted state (or an empty one) and publishes it.
    ///
    /// # Errors
    /// When the stored state cannot be read.
    pub fn open(
        store: Store,
    ) -> Result<(Self, watch::Receiver<Arc<Machine>>), StorageError<NodeId>> {
        let machine: Machine = store.get(MACHINE)?.unwrap_or_default();
        let snapshot = store.get::<StoredSnapshot>(SNAPSHOT)?.map(|s| (s.meta, s.data));
        let snapshot = Arc::new(std::sync::Mutex::new(snapshot));
        let (published, rx) = watch::channel(Arc::new(machine.clone()));
        Ok((Self { store, machine, snapshot, published }, rx))
    }

    fn save_and_publish(&self) -> Result<(), StorageError<NodeId>> {
        self.store.put(MACHINE, &self.machine)?;
        self.published.send_replace(Arc::new(self.machine.clone()));
        Ok(())
    }
}

/// The latest snapshot (built here or installed from the leader), shared by the state machine
/// and its builders: openraft purges the log behind it and sends it to nodes that lag.
type CurrentSnapshot = Arc<std::sync::Mutex<Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>>>;

/// Builds a snapshot: the serialized machine.
pub struct SnapshotBuilder {
    store: Store,
    machine: Machine,
    current: CurrentSnapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = serde_json::to_vec(&self.machine).map_err(io_err)?;
        let index = self.machine.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.machine.last_applied,
            last_membership: self.machine.membership.clone(),
            snapshot_id: format!("{index}-{}", rand::random::<u32>()),
        };
        // Durable before openraft may purge the log it covers.
        self.store.put(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        self.store.sync()?;
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok((self.machine.last_applied, self.machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            self.machine.last_applied = Some(e.log_id);
            out.push(match e.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Normal(cmd) => self.machine.table.apply(&cmd),
                EntryPayload::Membership(m) => {
                    self.machine.membership = StoredMembership::new(Some(e.log_id), m);
                    Applied::default()
                }
            });
        }
        self.save_and_publish()?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            machine: self.machine.clone(),
            current: self.snapshot.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let machine: Machine = serde_json::from_slice(&data).map_err(read_err)?;
        self.machine = machine;
        self.store.put(SNAPSHOT, &StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
        self.save_and_publish()?;
        self.store.sync()?;
        *self.snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let current = self.snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(current.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

/// Peer RPC paths on the cluster port.
pub mod path {
    /// `AppendEntries`.
    pub const APPEND: &str = "/raft/append";
    /// `RequestVote`.
    pub const VOTE: &str = "/raft/vote";
    /// `InstallSnapshot` (one chunk).
    pub const SNAPSHOT: &str = "/raft/snapshot";
}

/// An HTTP client for peers. Connections leave from `local` (the node's cluster address, when
/// it names one), so peers, firewalls and partition tests see the node's own address instead
/// of whatever the routing table picks.
///
/// # Errors
/// When the client cannot be built.
pub fn peer_client(local: Option<std::net::IpAddr>) -> Result<reqwest::Client, reqwest::Error> {
    // Peers speak plain HTTP, but the client is built with TLS support: it needs the one
    // process-wide provider (an error only means it is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(30))
        .local_address(local.filter(|ip| !ip.is_unspecified()))
        .build()
}

/// POSTs a protobuf body to `path` on a peer; the response body when the peer answered 2xx,
/// else `None` (logged at debug: peer traffic is retried or best effort by its callers).
pub async fn post_protobuf(
    client: &reqwest::Client,
    addr: &str,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Option<bytes::Bytes> {
    let response = client
        .post(format!("http://{addr}{path}"))
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| tracing::debug!(peer = addr, path, error = %e, "peer request failed"))
        .ok()?;
    if !response.status().is_success() {
        tracing::debug!(peer = addr, path, status = %response.status(), "peer refused");
        return None;
    }
    response.bytes().await.ok()
}

/// Creates clients for peers: HTTP/1.1 with JSON bodies to the peer's cluster address.
#[derive(Debug, Clone)]
pub struct Network {
    client: reqwest::Client,
}

impl Network {
    /// One connection pool for every peer.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(local: Option<std::net::IpAddr>) -> Result<Self, reqwest::Error> {
        Ok(Self { client: peer_client(local)? })
    }

    /// The HTTP client (shared with the replication engine's peer senders).
    #[must_use]
    pub fn client(&self) -> reqwest::Client {
        self.client.clone()
    }
}

/// A client for one peer.
#[derive(Debug)]
pub struct Peer {
    client: reqwest::Client,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer { client: self.client.clone(), target, addr: node.addr.clone() }
    }
}

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let url = format!("http://{}{path}", self.addr);
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(option.hard_ttl())
            .send()
            .await;
        let response = sent.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let bytes = response.bytes().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let result: Result<Resp, E> =
            serde_json::from_slice(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(path::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(path::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(path::VOTE, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn given_a_built_snapshot_should_be_the_current_one_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (mut sm, _) = StateMachine::open(store.clone()).unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().expect("current snapshot");
        assert_eq!(current.meta, built.meta, "openraft sends this one to lagging nodes");
        drop(sm);
        let (mut reopened, _) = StateMachine::open(store).unwrap();
        let again = reopened.get_current_snapshot().await.unwrap().expect("persisted");
        assert_eq!(again.meta, built.meta);
    }
}
