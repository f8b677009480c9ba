//! Prometheus metrics: the recorder (metrics-exporter-prometheus, rendered by our own HTTP
//! listener at `/metrics`), metric names, and per-shard counters.
//!
//! Hot paths never touch the global registry per message: each shard counts in plain cells
//! ([`ShardStats`]) and adds them to the registry on its housekeeping tick. Per-connection
//! events (gauges) and per-ack latencies go to the registry directly.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `switchboard_connections` | gauge | `transport` | open client connections (tcp, ws) |
//! | `switchboard_frames_in_total` | counter | `transport`, `type` | client frames decoded |
//! | `switchboard_frames_out_total` | counter | `transport`, `type` | server frames written |
//! | `switchboard_bytes_in_total` | counter | `transport`, `type` | bytes of client frames decoded |
//! | `switchboard_bytes_out_total` | counter | `transport`, `type` | bytes of server frames written |
//! | `switchboard_sessions` | gauge | | authenticated sessions |
//! | `switchboard_online_users` | gauge | | users with a session on this node |
//! | `switchboard_slow_consumer_disconnects_total` | counter | `reason` | connections cut off for not keeping up |
//! | `switchboard_rate_limited_total` | counter | `limit` | requests refused by a rate limit |
//! | `switchboard_connections_refused_total` | counter | `limit` | connections refused by a cap |
//! | `switchboard_mailbox_depth` | gauge | `shard` | messages waiting in a shard's mailbox |
//! | `switchboard_push_webhook_total` | counter | `outcome` | push webhook attempts |
//! | `switchboard_storage_bytes` | gauge | | the store's size on disk |
//! | `switchboard_storage_free_bytes` | gauge | | free space on the data directory's file system |
//! | `switchboard_storage_fsync_seconds` | histogram | | one journal fsync |
//! | `switchboard_storage_batch_ops` | histogram | | write operations per group commit |
//! | `switchboard_storage_batch_batches` | histogram | | shard batches per group commit |
//! | `switchboard_messages_stored_total` | counter | | user messages made durable |
//! | `switchboard_deliveries_total` | counter | | message pushes queued to sessions |
//! | `switchboard_send_ack_seconds` | histogram | | from a send reaching its owner to its ack |
//! | `switchboard_storage_round_seconds` | histogram | | one storage-writer round (write, then flush or fsync) |
//! | `switchboard_cluster_nodes` | gauge | `state` | nodes gossip knows of, `live` or `down` (cluster only) |
//! | `switchboard_cluster_control_leader_changes_total` | counter | | control plane (Raft) leader changes seen by this node |
//! | `switchboard_cluster_epoch_changes_total` | counter | | partition assignments changed by proposals of this node (as control leader) |
//! | `switchboard_cluster_partitions_led` | gauge | | partitions this node leads in the committed table |
//! | `switchboard_cluster_partitions_serving` | gauge | | partitions this node leads and serves (epoch marker committed by a majority) |
//! | `switchboard_replication_sync_seconds` | histogram | | one replication round's write and fsync |
//! | `switchboard_replication_step_downs_total` | counter | | leaderships of this node ended by a newer epoch |
//! | `switchboard_replication_dropped_total` | counter | `direction` | replication frames dropped on a full queue (`in`, `out`); leaders retransmit |
//! | `switchboard_auth_failures_total` | counter | `reason` | tokens rejected in Hello or RefreshToken, by reason (`expired`, `bad_signature`, ...: docs/protocol.md) |
//!
//! Every metric, with the cluster's and what to alert on: `docs/operations.md`.

use std::cell::Cell;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchboard_protocol::kinds::KINDS;

/// Open client connections.
pub const CONNECTIONS: &str = "switchboard_connections";
/// Client frames decoded.
pub const FRAMES_IN: &str = "switchboard_frames_in_total";
/// Server frames written.
pub const FRAMES_OUT: &str = "switchboard_frames_out_total";
/// Bytes of client frames decoded (length prefix or WebSocket message included).
pub const BYTES_IN: &str = "switchboard_bytes_in_total";
/// Bytes of server frames written.
pub const BYTES_OUT: &str = "switchboard_bytes_out_total";
/// User messages made durable.
pub const MESSAGES_STORED: &str = "switchboard_messages_stored_total";
/// Message pushes queued to sessions.
pub const DELIVERIES: &str = "switchboard_deliveries_total";
/// Send to ack latency.
pub const SEND_ACK_SECONDS: &str = "switchboard_send_ack_seconds";

/// Seconds one storage-writer round took: the atomic batch write plus, by durability, its
/// flush or fsync.
pub const STORAGE_ROUND_SECONDS: &str = "switchboard_storage_round_seconds";

/// Cluster nodes known to gossip, by state (`live`, `down`).
pub const CLUSTER_NODES: &str = "switchboard_cluster_nodes";

/// Control plane leader changes seen by this node.
pub const CLUSTER_LEADER_CHANGES: &str = "switchboard_cluster_control_leader_changes_total";
/// Partition assignments changed by this node's proposals.
pub const CLUSTER_EPOCH_CHANGES: &str = "switchboard_cluster_epoch_changes_total";
/// Partitions this node leads.
pub const CLUSTER_PARTITIONS_LED: &str = "switchboard_cluster_partitions_led";

/// Partitions this node leads and serves.
pub const CLUSTER_PARTITIONS_SERVING: &str = "switchboard_cluster_partitions_serving";
/// One replication round's write and fsync.
pub const REPLICATION_SYNC_SECONDS: &str = "switchboard_replication_sync_seconds";
/// Leaderships ended by a newer epoch.
pub const REPLICATION_STEP_DOWNS: &str = "switchboard_replication_step_downs_total";
/// Replication frames dropped on a full queue.
pub const REPLICATION_DROPPED: &str = "switchboard_replication_dropped_total";
/// Worst replication lag of the partitions this node leads, in entries.
pub const REPLICATION_LAG: &str = "switchboard_replication_lag_entries";
/// Committed entries not yet applied to this node's store, over all partitions.
pub const REPLICATION_APPLY_LAG: &str = "switchboard_replication_apply_lag_entries";
/// Committed entries applied to this node's store.
pub const REPLICATION_APPLIED: &str = "switchboard_replication_applied_entries_total";
/// Replicated log entries read back from disk for a lagging replica (their payloads had left
/// memory).
pub const REPLICATION_DISK_READS: &str = "switchboard_replication_disk_reads_total";
/// Requests forwarded to the node leading their conversation, by outcome.
pub const FORWARDED: &str = "switchboard_forwarded_requests_total";
/// Partitions compared with their leader by anti-entropy, by outcome.
pub const ANTI_ENTROPY_CHECKS: &str = "switchboard_antientropy_checks_total";
/// Committed messages anti-entropy restored on this node.
pub const ANTI_ENTROPY_REPAIRED: &str = "switchboard_antientropy_repaired_messages_total";
/// Presence batches sent to other nodes, by outcome.
pub const PRESENCE_BATCHES: &str = "switchboard_presence_batches_total";
/// Presence reports or changes dropped because a node's queue was full.
pub const PRESENCE_DROPPED: &str = "switchboard_presence_dropped_total";

/// Admin API requests refused for a missing or wrong token.
pub const ADMIN_UNAUTHORIZED: &str = "switchboard_admin_unauthorized_total";
/// Tokens rejected (Hello and RefreshToken), by `reason` (`Error.reason` on the wire).
pub const AUTH_FAILURES: &str = "switchboard_auth_failures_total";

/// Authenticated sessions on this node.
pub const SESSIONS: &str = "switchboard_sessions";
/// Users with at least one session on this node.
pub const ONLINE_USERS: &str = "switchboard_online_users";
/// Connections cut off because they did not keep up, by reason.
pub const SLOW_CONSUMERS: &str = "switchboard_slow_consumer_disconnects_total";
/// Requests and connections refused by a rate limit, by limit.
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
/// Connections refused by a connection cap, by limit.
pub const CONNECTIONS_REFUSED: &str = "switchboard_connections_refused_total";
/// Messages waiting in a shard's mailbox, by shard.
pub const MAILBOX_DEPTH: &str = "switchboard_mailbox_depth";
/// Push webhook deliveries, by outcome.
pub const PUSH_WEBHOOK: &str = "switchboard_push_webhook_total";
/// Bytes the store takes on disk (journal and tables).
pub const STORAGE_BYTES: &str = "switchboard_storage_bytes";
/// Bytes free for unprivileged users on the data directory's file system.
pub const STORAGE_FREE_BYTES: &str = "switchboard_storage_free_bytes";
/// Reads that found damaged stored data (checksum or decoding failures).
pub const STORAGE_DAMAGE: &str = "switchboard_storage_damage_total";
/// One fsync of the store's journal.
pub const FSYNC_SECONDS: &str = "switchboard_storage_fsync_seconds";
/// Write operations per storage-writer round (a group commit).
pub const BATCH_OPS: &str = "switchboard_storage_batch_ops";
/// Write batches (one per shard flush) per storage-writer round.
pub const BATCH_BATCHES: &str = "switchboard_storage_batch_batches";

/// How often the recorder's histogram samples are folded into their buckets.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder. `None` if one is installed already (a second broker in
/// the same process); that broker then serves an empty `/metrics`.
#[must_use]
pub fn install() -> Option<PrometheusHandle> {
    // Every histogram is a latency in seconds: one set of buckets, 100 µs to 1 s.
    // Group-commit sizes are counts: powers of two up to the writer's round cap.
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
    let recorder = PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ])
        .ok()?
        .set_buckets_for_metric(Matcher::Full(BATCH_OPS.to_owned()), &sizes)
        .ok()?
        .set_buckets_for_metric(Matcher::Full(BATCH_BATCHES.to_owned()), &sizes)
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    metrics::describe_gauge!(CONNECTIONS, "Open client connections by transport.");
    metrics::describe_counter!(
        ADMIN_UNAUTHORIZED,
        "Admin API requests refused for a missing or wrong token."
    );
    metrics::describe_counter!(FRAMES_IN, "Client frames decoded, by transport and type.");
    metrics::describe_counter!(FRAMES_OUT, "Server frames written, by transport and type.");
    metrics::describe_counter!(
        BYTES_IN,
        "Bytes of client frames decoded (TCP: with the length prefix; WebSocket: the message), by transport and type."
    );
    metrics::describe_counter!(
        BYTES_OUT,
        "Bytes of server frames written (TCP: with the length prefix; WebSocket: the message), by transport and type."
    );
    metrics::describe_gauge!(SESSIONS, "Authenticated sessions on this node.");
    metrics::describe_gauge!(ONLINE_USERS, "Users with at least one session on this node.");
    metrics::describe_counter!(
        SLOW_CONSUMERS,
        "Connections cut off for not keeping up, by reason (queue_full: outbound_queue_bytes exceeded; write_timeout: a write made no progress for 10 s)."
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        "Requests refused with RATE_LIMITED, by limit (send, typing, receipt, connection)."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused by a cap, by limit (max_connections, max_connections_per_ip)."
    );
    metrics::describe_gauge!(MAILBOX_DEPTH, "Messages waiting in a shard's mailbox, by shard.");
    metrics::describe_counter!(
        PUSH_WEBHOOK,
        "Push webhook attempts, by outcome (delivered; failed: retried later; gave_up: the last attempt failed)."
    );
    metrics::describe_gauge!(STORAGE_BYTES, "Bytes the store takes on disk (journal and tables).");
    metrics::describe_gauge!(
        STORAGE_FREE_BYTES,
        "Bytes available to the broker on the data directory's file system."
    );
    metrics::describe_counter!(
        STORAGE_DAMAGE,
        "Storage accesses that found damaged data (a block checksum or a record that does not decode); the data is not served."
    );
    metrics::describe_histogram!(FSYNC_SECONDS, "Seconds per fsync of the store's journal.");
    metrics::describe_histogram!(
        BATCH_OPS,
        "Write operations per storage-writer round (one group commit, one fsync in sync mode)."
    );
    metrics::describe_histogram!(
        BATCH_BATCHES,
        "Shard write batches per storage-writer round (one group commit)."
    );
    metrics::describe_counter!(MESSAGES_STORED, "User messages made durable.");
    metrics::describe_counter!(DELIVERIES, "Message pushes queued to sessions.");
    metrics::describe_histogram!(
        SEND_ACK_SECONDS,
        "Seconds from a send reaching its owner to its ack."
    );
    metrics::describe_histogram!(
        STORAGE_ROUND_SECONDS,
        "Seconds per storage-writer round (batch write, then flush or fsync by durability)."
    );
    metrics::describe_gauge!(
        CLUSTER_NODES,
        "Cluster nodes known to gossip, by state (live: heard from and serving; down: suspected or leaving)."
    );
    metrics::describe_counter!(
        CLUSTER_LEADER_CHANGES,
        "Control plane (Raft) leader changes seen by this node."
    );
    metrics::describe_counter!(
        CLUSTER_EPOCH_CHANGES,
        "Partition assignments (epochs) changed by this node's proposals as control leader."
    );
    metrics::describe_gauge!(CLUSTER_PARTITIONS_LED, "Partitions this node leads.");
    metrics::describe_gauge!(
        CLUSTER_PARTITIONS_SERVING,
        "Partitions this node leads and serves (its epoch marker is committed by a majority)."
    );
    metrics::describe_histogram!(
        REPLICATION_SYNC_SECONDS,
        "Seconds per replication round (write of promises and log suffixes, then one fsync)."
    );
    metrics::describe_counter!(
        REPLICATION_STEP_DOWNS,
        "Partition leaderships of this node ended by a newer epoch."
    );
    metrics::describe_counter!(
        REPLICATION_DROPPED,
        "Replication frames dropped on a full queue, by direction; leaders retransmit."
    );
    metrics::describe_gauge!(
        REPLICATION_LAG,
        "Entries the furthest-behind follower has not acknowledged, worst over the partitions this node leads."
    );
    metrics::describe_gauge!(
        REPLICATION_APPLY_LAG,
        "Committed entries not yet applied to this node's message store, summed over partitions."
    );
    metrics::describe_counter!(
        REPLICATION_APPLIED,
        "Committed replicated entries applied to this node's message store."
    );
    metrics::describe_counter!(
        REPLICATION_DISK_READS,
        "Replication log entries read back from disk for a replica that lags beyond cluster.log_memory_entries."
    );
    metrics::describe_counter!(
        FORWARDED,
        "Client requests forwarded to the node leading their conversation, by outcome (ok: the leader answered; unavailable: it could not be reached)."
    );
    metrics::describe_counter!(
        ANTI_ENTROPY_CHECKS,
        "Partitions this node compared with a peer replica's digest (its leader's, or as leader each follower's), by outcome (equal; repaired; behind: not yet applied as far as the digest; failed)."
    );
    metrics::describe_counter!(
        ANTI_ENTROPY_REPAIRED,
        "Committed messages this node lacked and pulled from a partition leader (anti-entropy); nonzero means a store lost data or a bug."
    );
    metrics::describe_counter!(
        PRESENCE_BATCHES,
        "Presence batches (reports, snapshots, changes) sent to other nodes, by outcome (ok, failed)."
    );
    metrics::describe_counter!(
        PRESENCE_DROPPED,
        "Presence reports or changes dropped because the queue for their node was full (snapshots repair reports)."
    );
    Some(handle)
}

/// Open client connections of this process (every transport), for the load gossiped to peers.
static OPEN_CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Open client connections of this process.
#[must_use]
pub fn open_connections() -> u64 {
    OPEN_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A transport, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Length-prefixed frames over TCP.
    Tcp,
    /// The WebSocket bridge.
    Ws,
}

impl Transport {
    /// The label value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Ws => "ws",
        }
    }
}

/// Counters of one shard, added to the registry on each tick.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Client frames and their bytes, by transport and kind number.
    frames_in: ByKind,
    bytes_in: ByKind,
    /// Server frames and their bytes, by transport and kind number.
    frames_out: ByKind,
    bytes_out: ByKind,
    /// User messages made durable.
    pub messages_stored: Cell<u64>,
    /// Message pushes queued to sessions.
    pub deliveries: Cell<u64>,
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

type ByKind = [[Cell<u64>; KINDS]; 2];

fn cell(cells: &ByKind, t: Transport, kind: usize) -> Option<&Cell<u64>> {
    cells.get(t as usize).and_then(|k| k.get(kind))
}

/// Counts one frame of `kind` over `t`, and its `n` bytes.
fn count(frames: &ByKind, bytes: &ByKind, t: Transport, kind: usize, n: usize) {
    if let (Some(f), Some(b)) = (cell(frames, t, kind), cell(bytes, t, kind)) {
        bump(f, 1);
        bump(b, n as u64);
    }
}

impl ShardStats {
    /// Counts a decoded client frame of `kind` ([`switchboard_protocol::kinds`]) that took
    /// `bytes` on the wire.
    pub fn frame_in(&self, t: Transport, kind: usize, bytes: usize) {
        count(&self.frames_in, &self.bytes_in, t, kind, bytes);
    }

    /// Counts a written server frame of `kind` that took `bytes` on the wire.
    pub fn frame_out(&self, t: Transport, kind: usize, bytes: usize) {
        count(&self.frames_out, &self.bytes_out, t, kind, bytes);
    }

    /// Adds everything counted since the last call to the registry.
    pub fn export(&self) {
        for t in [Transport::Tcp, Transport::Ws] {
            let i = t as usize;
            let (Some(fi), Some(bi), Some(fo), Some(bo)) = (
                self.frames_in.get(i),
                self.bytes_in.get(i),
                self.frames_out.get(i),
                self.bytes_out.get(i),
            ) else {
                continue;
            };
            for kind in 0..KINDS {
                let name = switchboard_protocol::kinds::client_kind_name(kind);
                export_pair(fi.get(kind), bi.get(kind), FRAMES_IN, BYTES_IN, t, name);
                let name = switchboard_protocol::kinds::server_kind_name(kind);
                export_pair(fo.get(kind), bo.get(kind), FRAMES_OUT, BYTES_OUT, t, name);
            }
        }
        metrics::counter!(MESSAGES_STORED).increment(self.messages_stored.take());
        metrics::counter!(DELIVERIES).increment(self.deliveries.take());
    }
}

/// Adds a frame count and its bytes, when nonzero (a kind never seen makes no series).
fn export_pair(
    frames: Option<&Cell<u64>>,
    bytes: Option<&Cell<u64>>,
    frames_name: &'static str,
    bytes_name: &'static str,
    t: Transport,
    kind: &'static str,
) {
    let (Some(frames), Some(bytes)) = (frames, bytes) else { return };
    let n = frames.take();
    if n == 0 {
        return;
    }
    metrics::counter!(frames_name, "transport" => t.label(), "type" => kind).increment(n);
    metrics::counter!(bytes_name, "transport" => t.label(), "type" => kind).increment(bytes.take());
}

/// Counts an open connection until dropped.
#[derive(Debug)]
pub struct ConnectionGauge(Transport);

impl ConnectionGauge {
    /// A connection of `t` opened.
    #[must_use]
    pub fn open(t: Transport) -> Self {
        metrics::gauge!(CONNECTIONS, "transport" => t.label()).increment(1.0);
        OPEN_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(t)
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS, "transport" => self.0.label()).decrement(1.0);
        OPEN_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
