//! # Switchboard broker
//!
//! A sharded, thread-per-core chat broker with a durable per-conversation log.
//!
//! ## Layout
//! Dependencies point down this list; a lower module never imports a higher one.
//! - [`cli`]: the command line (`switchboard`, `switchboard token`, `switchboard print-config`).
//! - [`runtime`]: builds storage, the writer thread and the shard threads; signals; shutdown.
//! - [`cluster`]: scale-out, when `cluster.listen` is set: gossip membership, the Raft control
//!   plane and its partition table, per-partition replication ([`cluster::replica`], with a
//!   deterministic simulator in its tests, driven by [`cluster::replication`]) and partition
//!   placement ([`cluster::placement`]); see `docs/cluster.md`.
//! - [`net`]: transports ([`net::tcp`], [`net::ws`] behind [`net::http`]), the session state
//!   machine ([`net::session`]), one handler per request ([`net::handler`]), embedded files.
//! - [`shard`]: per-thread state and the mailboxes between shards: the partition owner
//!   ([`shard::owner`]), the user home ([`shard::home`]), hosted sessions ([`shard::local`]),
//!   outbound queues ([`shard::outbound`]).
//! - [`storage`]: fjall keyspaces, the group-commit writer thread, the durable-snapshot reader.
//! - [`auth`], [`config`], [`ratelimit`], [`push`]: tokens, configuration, rate limits (GCRA)
//!   and the push-notification webhook client.
//!
//! ## Invariants
//! 1. Per conversation, seqs are gapless; only the partition owner assigns them.
//! 2. Nothing is acknowledged, delivered or readable before the durability mode covers it: the
//!    owner acts on a batch only when the writer reports it committed (and fsynced in `sync`
//!    mode), and client reads use the snapshot published after that point.
//! 3. A send's idempotency key is checked against the pending map and the durable dedupe index
//!    before a seq is assigned; a retry never creates a second entry.
//! 4. Acks and deliveries from one owner to one shard travel in one FIFO mailbox, in log order.
//! 5. No mailbox loop awaits another shard; a full mailbox spills into an ordered overflow.
//! 6. Bad input gets a typed error or a `Disconnect` and a close; it never panics. (A panic
//!    anywhere aborts the process: half a broker is worse than a restart.)

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod net;
pub mod push;
pub mod ratelimit;
pub mod runtime;
pub mod shard;
pub mod storage;

pub use config::Config;
pub use runtime::{Bound, BrokerHandle, Exit, StartError, run, run_with};
