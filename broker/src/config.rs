//! Broker configuration: one serde struct per section, each with documented defaults.
//!
//! Sources, lowest precedence first: built-in defaults, an optional TOML file (`--config`),
//! `SWITCHBOARD_*` environment variables, command-line flags. The last two are merged by clap
//! (see [`crate::cli`]) and applied with [`Config::apply`]. [`Config::validate`] rejects
//! impossible values with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration error, naming the offending key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file is invalid (syntax, unknown key, wrong type).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The key, as written in the TOML file.
        key: std::borrow::Cow<'static, str>,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, shards and timeouts.
    pub server: ServerConfig,
    /// The HTTP listener: WebSocket bridge, metrics, health, demo page.
    pub http: HttpConfig,
    /// Data directory and durability.
    pub storage: StorageConfig,
    /// Per-connection and per-request limits.
    pub limits: LimitsConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// Presence and typing.
    pub presence: PresenceConfig,
    /// Push notifications for offline users.
    pub push: PushConfig,
    /// Clustering with other brokers (off unless `cluster.listen` is set).
    pub cluster: ClusterConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the binary protocol listener. Default `127.0.0.1:7400`; port 0 picks a free
    /// port (printed in the ready line).
    pub listen: SocketAddr,
    /// Number of shards (threads with their own event loop). 0 means one per available core.
    pub shards: usize,
    /// A connection must send `Hello` within this time. Default 5000.
    pub hello_timeout_ms: u64,
    /// Announced to clients: how often to ping when idle. Default 15000.
    pub heartbeat_interval_ms: u64,
    /// A connection that sends nothing for this long is closed. Default 30000.
    pub idle_timeout_ms: u64,
    /// Time budget for a graceful shutdown. Default 5000.
    pub shutdown_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            shards: 0,
            hello_timeout_ms: 5_000,
            heartbeat_interval_ms: 15_000,
            idle_timeout_ms: 30_000,
            shutdown_timeout_ms: 5_000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// HTTP listener (`/ws`, `/metrics`, `/healthz`, `/readyz`, the demo page at `/`).
    /// Default `127.0.0.1:7401`; port 0 picks a free port (printed in the ready line).
    pub listen: SocketAddr,
    /// Origins allowed to open a WebSocket (`https://chat.example.com`); `*` allows any.
    /// Empty (the default): only the broker's own origin, and clients that send no `Origin`.
    pub allowed_origins: Vec<String>,
    /// Serve `POST /dev/token` (mints a token for any user name, for the demo page) when it is
    /// safe: every listener on a loopback address and the generated local secret in use.
    /// Default true; it is never served otherwise.
    pub dev_tokens: bool,
    /// Bearer token of the admin API under `/admin/` (sessions, conversations, stats, cluster
    /// operations). Unset (the
    /// default): the admin API is off and answers 404. At least 16 bytes.
    pub admin_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7401)),
            allowed_origins: Vec::new(),
            dev_tokens: true,
            admin_token: None,
        }
    }
}

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the database and the generated token secret. Default `./data`.
    pub data_dir: PathBuf,
    /// When a send is acknowledged: `sync` (after fsync, the default), `interval:<ms>` (after
    /// the write reached the OS; fsync every `<ms>`), or `buffered` (no fsync; benchmarks only).
    pub durability: Durability,
    /// Block cache size in MiB. Default 64.
    pub cache_mb: u64,
    /// Free space (MiB) the data directory's file system must keep: below it, sends and
    /// conversation changes are refused with `STORAGE_FULL` (checked every second), well
    /// before a write could fail for want of space (which stops the store). 0 turns the check
    /// off. Default 256.
    pub min_free_mb: u64,
    /// Journal size (MiB) after which the store flushes its memtables so old journal files
    /// can go: it bounds the replay after a crash (recovery time) and the journal's disk use.
    /// At least 64. Default 512.
    pub max_journal_mb: u64,
    /// Memtable size (MiB) per keyspace: writes gather in memory up to it before they are
    /// flushed to a table file. The store has nine keyspaces, so memtables can hold up to nine
    /// times this. Takes effect when the data directory is created (fjall keeps the size a
    /// keyspace was created with; the broker warns at start when they differ). 1 to 1024.
    /// Default 64.
    pub memtable_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Sync,
            cache_mb: 64,
            min_free_mb: 256,
            max_journal_mb: 512,
            memtable_mb: 64,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame in bytes, length prefix excluded. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Largest message body (text or data) in bytes. Default 64 KiB.
    pub max_body_bytes: usize,
    /// Requests a connection may have outstanding before the broker stops reading from it.
    /// Default 256.
    pub max_inflight: usize,
    /// Bytes queued toward one connection before it is disconnected as a slow consumer.
    /// Default 4 MiB.
    pub outbound_queue_bytes: usize,
    /// Largest group. Default 10000.
    pub max_group_members: usize,
    /// Most users in one create/add/remove request. Default 500.
    pub max_members_per_request: usize,
    /// Largest `History.limit`. Default 200.
    pub max_history_limit: u32,
    /// Largest `Sync.limit` (messages per page). Default 1000.
    pub max_sync_limit: u32,
    /// Sustained sends per second per user (GCRA). Default 20.
    pub send_rate_per_sec: u32,
    /// Sends a user may make in a burst. Default 100.
    pub send_burst: u32,
    /// Typing updates per second per user. Default 5.
    pub typing_rate_per_sec: u32,
    /// Typing updates in a burst. Default 20.
    pub typing_burst: u32,
    /// Receipt updates (mark read / delivered) per second per user. Default 50.
    pub receipt_rate_per_sec: u32,
    /// Receipt updates in a burst. Default 200.
    pub receipt_burst: u32,
    /// New connections per second from one IP address. Default 50.
    pub connect_rate_per_ip: u32,
    /// New connections in a burst from one IP address. Default 200.
    pub connect_burst_per_ip: u32,
    /// Concurrent sessions per user. Default 20.
    pub max_connections_per_user: usize,
    /// Open client connections (TCP, and HTTP including WebSockets, before or after Hello) in
    /// all; 0 = no cap.
    /// Default 100000. Keep it below the process's open-file limit.
    pub max_connections: usize,
    /// Open client connections from one IP address; 0 = no cap (the default: clients behind
    /// one NAT or proxy share an address). Set it on a broker facing the internet directly.
    pub max_connections_per_ip: usize,
    /// Conversations a user may belong to when creating another one. Default 10000.
    pub max_conversations_per_user: usize,
    /// Most users in one presence query or subscribe request. Default 500.
    pub max_presence_users: usize,
    /// Most users one session may subscribe to for presence. Default 1000.
    pub max_presence_subscriptions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: switchboard_protocol::DEFAULT_MAX_FRAME_BYTES,
            max_body_bytes: switchboard_protocol::DEFAULT_MAX_BODY_BYTES,
            max_inflight: 256,
            outbound_queue_bytes: 4 << 20,
            max_group_members: 10_000,
            max_members_per_request: 500,
            max_history_limit: 200,
            max_sync_limit: 1_000,
            send_rate_per_sec: 20,
            send_burst: 100,
            typing_rate_per_sec: 5,
            typing_burst: 20,
            receipt_rate_per_sec: 50,
            receipt_burst: 200,
            connect_rate_per_ip: 50,
            connect_burst_per_ip: 200,
            max_connections_per_user: 20,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_conversations_per_user: 10_000,
            max_presence_users: 500,
            max_presence_subscriptions: 1_000,
        }
    }
}

/// `[presence]`
///
/// A session counts as online while it sends frames: the broker closes it after
/// `server.idle_timeout_ms` without one (the presence TTL), and clients ping every
/// `server.heartbeat_interval_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// A user whose last session closes and who reconnects within this time does not flap
    /// offline and online. Default 5000.
    pub grace_ms: u64,
    /// How long a typing indicator shows unless renewed. Default 5000.
    pub typing_expires_ms: u64,
    /// How often changed last-seen times are written. Default 1000.
    pub last_seen_flush_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { grace_ms: 5_000, typing_expires_ms: 5_000, last_seen_flush_ms: 1_000 }
    }
}

/// `[push]`: an HTTP webhook told about messages for users with no online session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// `http(s)://` URL that receives a signed JSON POST per notification. Off when unset.
    pub webhook_url: Option<String>,
    /// Key of the `X-Switchboard-Signature` HMAC-SHA256 header. Required with a webhook.
    pub secret: Option<String>,
    /// Messages to an offline user within this window become one notification per
    /// conversation. Default 10000.
    pub window_ms: u64,
    /// Conversations with more members do not notify (mention-style pushes are for the
    /// application to build). Default 100.
    pub max_group_size: usize,
    /// Delivery attempts before a notification is dropped. Default 10.
    pub max_attempts: u32,
    /// Timeout of one delivery attempt. Default 5000.
    pub timeout_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            secret: None,
            window_ms: 10_000,
            max_group_size: 100,
            max_attempts: 10,
            timeout_ms: 5_000,
        }
    }
}

/// `[cluster]`: gossip membership with other brokers. Off unless `listen` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Gossip (UDP) address. Clustering is off when unset.
    pub listen: Option<SocketAddr>,
    /// Address peers reach this node at, when it differs from `listen` (NAT, 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Gossip addresses (`host:port`) of nodes to join through. Empty: this node founds a
    /// cluster.
    pub seeds: Vec<String>,
    /// Nodes gossip only with nodes of the same cluster id.
    pub cluster_id: String,
    /// This node's id, unique in the cluster. Unset: generated on the first start and kept in
    /// `<data_dir>/cluster/node_id`.
    pub node_id: Option<u64>,
    /// Gossip round interval. Default 250.
    pub gossip_interval_ms: u64,
    /// Phi-accrual failure detector threshold: higher suspects later. Default 8.
    pub phi_threshold: f64,
    /// A node suspected down this long is forgotten. Default 3600000 (1 h).
    pub dead_node_grace_ms: u64,
    /// Replicas per partition (R). Default 3; with fewer nodes every node holds every
    /// partition and the loss of a node is not survivable. Run as many nodes as replicas
    /// (nodes outside a partition's replica set forward its reads and follow it through its
    /// leader, with the limits docs/cluster.md lists).
    pub replication: usize,
    /// The control plane is founded once this many nodes are live in gossip. Default 3.
    pub bootstrap_expect: usize,
    /// Control plane (Raft) election timeout; a new control leader is elected within one to
    /// two of these after the old one fails. Default 1500.
    pub election_timeout_ms: u64,
    /// Applied replication log entries per partition whose payloads stay in memory (older
    /// ones are read back from disk for a replica that lags further). Default 1024.
    pub log_memory_entries: u64,
    /// Time between anti-entropy rounds, in which a node compares the partitions it follows
    /// with their leaders and pulls committed messages it lacks. 0 turns it off. Default 30000.
    pub anti_entropy_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: None,
            advertise: None,
            seeds: Vec::new(),
            cluster_id: "switchboard".into(),
            node_id: None,
            gossip_interval_ms: 250,
            phi_threshold: 8.0,
            dead_node_grace_ms: 3_600_000,
            replication: 3,
            bootstrap_expect: 3,
            election_timeout_ms: 1_500,
            log_memory_entries: 1_024,
            anti_entropy_interval_ms: 30_000,
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Signature algorithm tokens must use: `HS256` (default), `RS256` or `EdDSA`.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret. When neither this nor `secret_file` is set, a random secret is
    /// generated on first need and kept in `<data_dir>/jwt.secret` (mode 0600).
    pub secret: Option<String>,
    /// File holding the HS256 secret.
    pub secret_file: Option<PathBuf>,
    /// PEM public key file for RS256 or EdDSA.
    pub public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30. A session is closed
    /// once its token's `exp` plus this passes.
    pub leeway_secs: u64,
    /// Named keys (`[[auth.keys]]`), for key rotation: a token whose header carries a `kid`
    /// is verified with the key of that id only. The key above (`algorithm`, `secret`, ...)
    /// is unnamed: it verifies tokens without a `kid`, and with no named keys configured every
    /// token, whatever its `kid`. With named keys configured, the
    /// unnamed key is used only when its material is set explicitly (`secret`,
    /// `secret_file` or `public_key_file`); the generated secret is then not used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyConfig>,
}

/// One `[[auth.keys]]` entry: a verification key with an id (`kid`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id tokens name in their header's `kid`.
    pub kid: String,
    /// `HS256` (default), `RS256` or `EdDSA`.
    #[serde(default = "hs256")]
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (at least 16 bytes).
    pub secret: Option<String>,
    /// File holding the HS256 secret.
    pub secret_file: Option<PathBuf>,
    /// PEM public key file for RS256 or EdDSA.
    pub public_key_file: Option<PathBuf>,
}

fn hs256() -> JwtAlgorithm {
    JwtAlgorithm::Hs256
}

impl AuthConfig {
    /// Whether the unnamed key verifies tokens: always without named keys; with named keys,
    /// only when its material is configured explicitly.
    #[must_use]
    pub fn unnamed_key_in_use(&self) -> bool {
        self.keys.is_empty()
            || self.secret.is_some()
            || self.secret_file.is_some()
            || self.public_key_file.is_some()
    }

    fn validate_keys(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for k in &self.keys {
            let name = |field: &str| format!("auth.keys[kid = {:?}].{field}", k.kid);
            if k.kid.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "auth.keys.kid".into(),
                    message: "must not be empty".into(),
                });
            }
            if !seen.insert(k.kid.as_str()) {
                return Err(ConfigError::Invalid {
                    key: name("kid").into(),
                    message: "is configured twice".into(),
                });
            }
            let err = |field: &str, message: &str| ConfigError::Invalid {
                key: name(field).into(),
                message: message.into(),
            };
            match k.algorithm {
                JwtAlgorithm::Hs256 => {
                    if k.public_key_file.is_some() {
                        return Err(err("public_key_file", "is for RS256 and EdDSA keys"));
                    }
                    match (&k.secret, &k.secret_file) {
                        (None, None) => {
                            return Err(err("secret", "or secret_file is required for HS256"));
                        }
                        (Some(_), Some(_)) => {
                            return Err(err("secret", "and secret_file are exclusive"));
                        }
                        (Some(s), None) if s.len() < 16 => {
                            return Err(err("secret", "must be at least 16 bytes"));
                        }
                        _ => {}
                    }
                }
                JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                    if k.secret.is_some() || k.secret_file.is_some() {
                        return Err(err("secret", "is for HS256 keys"));
                    }
                    if k.public_key_file.is_none() {
                        return Err(err("public_key_file", "is required for RS256 and EdDSA"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::Hs256,
            secret: None,
            secret_file: None,
            public_key_file: None,
            audience: None,
            issuer: None,
            leeway_secs: 30,
            keys: Vec::new(),
        }
    }
}

/// A supported JWT algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    #[serde(rename = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, verified with a public key.
    #[serde(rename = "RS256")]
    Rs256,
    /// Ed25519, verified with a public key.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl FromStr for JwtAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "HS256" => Ok(Self::Hs256),
            "RS256" => Ok(Self::Rs256),
            "EDDSA" => Ok(Self::EdDsa),
            other => Err(format!("unknown algorithm {other:?} (expected HS256, RS256 or EdDSA)")),
        }
    }
}

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge after an fsync covers the write (group commit).
    Sync,
    /// Acknowledge once the write reached the OS; fsync at this interval. A power loss can lose
    /// up to one interval of acknowledged writes; a process crash loses nothing.
    Interval(Duration),
    /// Never fsync. Acknowledged writes can be lost on a crash. For benchmarks.
    Buffered,
}

impl FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Self::Sync),
            "buffered" => Ok(Self::Buffered),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Self::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "unknown durability {s:?} (expected sync, interval:<ms> with ms > 0, or buffered)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sync => f.write_str("sync"),
            Self::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            Self::Buffered => f.write_str("buffered"),
        }
    }
}

impl Serialize for Durability {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Durability {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Values given on the command line or in the environment; `None` keeps the file's value.
#[derive(Debug, Clone, Default)]
#[allow(missing_docs)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub shards: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub durability: Option<Durability>,
    pub max_frame_bytes: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub max_inflight: Option<usize>,
    pub outbound_queue_bytes: Option<usize>,
    pub hello_timeout_ms: Option<u64>,
    pub heartbeat_interval_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub jwt_algorithm: Option<JwtAlgorithm>,
    pub jwt_secret: Option<String>,
    pub jwt_secret_file: Option<PathBuf>,
    pub jwt_public_key: Option<PathBuf>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub node_id: Option<u64>,
    pub cluster_listen: Option<SocketAddr>,
    pub seeds: Option<Vec<String>>,
    pub bootstrap_expect: Option<usize>,
}

impl Config {
    /// Parses TOML text.
    ///
    /// # Errors
    /// The parser's message when the text is invalid.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Builds the configuration from an optional TOML file plus `section.key=value`
    /// assignments (from `--set` and from `SWITCHBOARD_<SECTION>__<KEY>` variables), applied in
    /// order over the file. Values are TOML (`20`, `true`, `"text"`); a value that does not
    /// parse as TOML is taken as a string.
    ///
    /// # Errors
    /// When the file cannot be read, a key is unknown, or a value has the wrong type.
    pub fn load(
        file: Option<&Path>,
        assignments: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                Self::load_text(&text, path.to_owned(), assignments)
            }
            None => Self::load_text("", PathBuf::from("<defaults>"), assignments),
        }
    }

    /// Applies `section.key=value` assignments over this configuration.
    ///
    /// # Errors
    /// When a key is unknown or a value has the wrong type.
    pub fn assign(self, assignments: &[(String, String)]) -> Result<Self, ConfigError> {
        if assignments.is_empty() {
            return Ok(self);
        }
        let origin = PathBuf::from("<--set>");
        let text = toml::to_string(&self)
            .map_err(|e| ConfigError::Parse { path: origin.clone(), message: e.to_string() })?;
        Self::load_text(&text, origin, assignments)
    }

    fn load_text(
        text: &str,
        origin: PathBuf,
        assignments: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Parse { path: origin.clone(), message: e.to_string() }
        })?;
        for (key, raw) in assignments {
            let Some((section, name)) = key.split_once('.') else {
                return Err(ConfigError::Parse {
                    path: origin,
                    message: format!(
                        "`{key}`: expected <section>.<key>, e.g. limits.send_rate_per_sec"
                    ),
                });
            };
            let value = format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.clone()));
            let entry = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(name.to_owned(), value);
                }
                _ => {
                    return Err(ConfigError::Parse {
                        path: origin,
                        message: format!("`{section}` is not a section"),
                    });
                }
            }
        }
        Self::deserialize(table)
            .map_err(|e| ConfigError::Parse { path: origin, message: e.to_string() })
    }

    /// Applies command-line and environment values over this configuration.
    pub fn apply(&mut self, o: Overrides) {
        macro_rules! set {
            ($field:expr, $value:expr) => {
                if let Some(v) = $value {
                    $field = v;
                }
            };
        }
        set!(self.server.listen, o.listen);
        set!(self.http.listen, o.http_listen);
        set!(self.server.shards, o.shards);
        set!(self.server.hello_timeout_ms, o.hello_timeout_ms);
        set!(self.server.heartbeat_interval_ms, o.heartbeat_interval_ms);
        set!(self.server.idle_timeout_ms, o.idle_timeout_ms);
        set!(self.storage.data_dir, o.data_dir);
        set!(self.storage.durability, o.durability);
        set!(self.limits.max_frame_bytes, o.max_frame_bytes);
        set!(self.limits.max_body_bytes, o.max_body_bytes);
        set!(self.limits.max_inflight, o.max_inflight);
        set!(self.limits.outbound_queue_bytes, o.outbound_queue_bytes);
        set!(self.auth.algorithm, o.jwt_algorithm);
        if o.jwt_secret.is_some() {
            self.auth.secret = o.jwt_secret;
        }
        if o.jwt_secret_file.is_some() {
            self.auth.secret_file = o.jwt_secret_file;
        }
        if o.jwt_public_key.is_some() {
            self.auth.public_key_file = o.jwt_public_key;
        }
        if o.jwt_audience.is_some() {
            self.auth.audience = o.jwt_audience;
        }
        if o.jwt_issuer.is_some() {
            self.auth.issuer = o.jwt_issuer;
        }
        if o.node_id.is_some() {
            self.cluster.node_id = o.node_id;
        }
        if o.cluster_listen.is_some() {
            self.cluster.listen = o.cluster_listen;
        }
        set!(self.cluster.seeds, o.seeds);
        set!(self.cluster.bootstrap_expect, o.bootstrap_expect);
    }

    /// Whether `POST /dev/token` may be served, and if not, why.
    ///
    /// # Errors
    /// The reason it is off.
    pub fn dev_tokens(&self) -> Result<(), &'static str> {
        if !self.http.dev_tokens {
            return Err("http.dev_tokens is false");
        }
        if !self.server.listen.ip().is_loopback() || !self.http.listen.ip().is_loopback() {
            return Err("a listener is on a non-loopback address");
        }
        if self.auth.algorithm != JwtAlgorithm::Hs256
            || self.auth.secret.is_some()
            || self.auth.secret_file.is_some()
            || !self.auth.keys.is_empty()
        {
            return Err("a JWT key is configured");
        }
        Ok(())
    }

    /// The number of shards to run (resolving 0 to the number of cores).
    #[must_use]
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        }
    }

    /// Checks every value; the error names the key.
    ///
    /// # Errors
    /// The first invalid value found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key: key.into(), message: message.into() }
        }
        let l = &self.limits;
        let s = &self.server;
        if !(64..=1 << 30).contains(&self.storage.max_journal_mb) {
            return Err(invalid("storage.max_journal_mb", "must be between 64 and 2^30"));
        }
        if !(1..=1024).contains(&self.storage.memtable_mb) {
            return Err(invalid("storage.memtable_mb", "must be between 1 and 1024"));
        }
        if self.storage.min_free_mb > 1 << 30 {
            return Err(invalid("storage.min_free_mb", "must be at most 2^30"));
        }
        if self.server.shards > crate::shard::MAX_SHARDS {
            return Err(invalid(
                "server.shards",
                format!("at most {} shards are supported", crate::shard::MAX_SHARDS),
            ));
        }
        if !(64 << 10..=16 << 20).contains(&l.max_frame_bytes) {
            return Err(invalid("limits.max_frame_bytes", "must be between 64 KiB and 16 MiB"));
        }
        if l.max_body_bytes == 0 || l.max_body_bytes + (16 << 10) > l.max_frame_bytes {
            return Err(invalid(
                "limits.max_body_bytes",
                "must be at least 1 and 16 KiB below limits.max_frame_bytes",
            ));
        }
        if l.max_inflight == 0 {
            return Err(invalid("limits.max_inflight", "must be at least 1"));
        }
        if l.outbound_queue_bytes < l.max_frame_bytes {
            return Err(invalid(
                "limits.outbound_queue_bytes",
                "must be at least limits.max_frame_bytes",
            ));
        }
        if l.max_group_members < 2 {
            return Err(invalid("limits.max_group_members", "must be at least 2"));
        }
        if l.max_members_per_request == 0 {
            return Err(invalid("limits.max_members_per_request", "must be at least 1"));
        }
        if l.max_history_limit == 0 {
            return Err(invalid("limits.max_history_limit", "must be at least 1"));
        }
        if l.max_sync_limit == 0 {
            return Err(invalid("limits.max_sync_limit", "must be at least 1"));
        }
        if s.hello_timeout_ms == 0 {
            return Err(invalid("server.hello_timeout_ms", "must be at least 1"));
        }
        if s.heartbeat_interval_ms == 0 || s.heartbeat_interval_ms >= s.idle_timeout_ms {
            return Err(invalid(
                "server.heartbeat_interval_ms",
                "must be positive and below server.idle_timeout_ms",
            ));
        }
        if l.send_rate_per_sec == 0 || l.send_burst == 0 {
            return Err(invalid("limits.send_rate_per_sec", "rates and bursts must be at least 1"));
        }
        if l.typing_rate_per_sec == 0 || l.typing_burst == 0 {
            return Err(invalid(
                "limits.typing_rate_per_sec",
                "rates and bursts must be at least 1",
            ));
        }
        if l.receipt_rate_per_sec == 0 || l.receipt_burst == 0 {
            return Err(invalid(
                "limits.receipt_rate_per_sec",
                "rates and bursts must be at least 1",
            ));
        }
        if l.connect_rate_per_ip == 0 || l.connect_burst_per_ip == 0 {
            return Err(invalid(
                "limits.connect_rate_per_ip",
                "rates and bursts must be at least 1",
            ));
        }
        if l.max_connections_per_user == 0 {
            return Err(invalid("limits.max_connections_per_user", "must be at least 1"));
        }
        if l.max_presence_users == 0 {
            return Err(invalid("limits.max_presence_users", "must be at least 1"));
        }
        if l.max_presence_subscriptions == 0 {
            return Err(invalid("limits.max_presence_subscriptions", "must be at least 1"));
        }
        if l.max_conversations_per_user == 0 {
            return Err(invalid("limits.max_conversations_per_user", "must be at least 1"));
        }
        if self.presence.typing_expires_ms == 0 || self.presence.last_seen_flush_ms == 0 {
            return Err(invalid("presence.typing_expires_ms", "timings must be at least 1 ms"));
        }
        let p = &self.push;
        if self.http.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("http.admin_token", "must be at least 16 bytes"));
        }
        if let Some(url) = &p.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid("push.webhook_url", "must be an http:// or https:// URL"));
            }
            if p.secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(invalid(
                    "push.secret",
                    "at least 16 bytes are required with a webhook",
                ));
            }
        }
        if p.window_ms == 0 || p.max_attempts == 0 || p.timeout_ms == 0 {
            return Err(invalid(
                "push.window_ms",
                "window, attempts and timeout must be at least 1",
            ));
        }
        let c = &self.cluster;
        if c.node_id == Some(0) {
            return Err(invalid("cluster.node_id", "must be at least 1"));
        }
        if c.gossip_interval_ms == 0 {
            return Err(invalid("cluster.gossip_interval_ms", "must be at least 1"));
        }
        if !(c.phi_threshold.is_finite() && c.phi_threshold > 0.0) {
            return Err(invalid("cluster.phi_threshold", "must be a positive number"));
        }
        if let Some(listen) = c.listen
            && listen.ip().is_unspecified()
            && c.advertise.is_none_or(|a| a.ip().is_unspecified())
        {
            return Err(invalid(
                "cluster.advertise",
                "is required (with a concrete IP) when cluster.listen is a wildcard address",
            ));
        }
        if c.replication == 0 || c.bootstrap_expect == 0 {
            return Err(invalid(
                "cluster.replication",
                "replication and bootstrap_expect must be at least 1",
            ));
        }
        if c.election_timeout_ms < 50 {
            return Err(invalid("cluster.election_timeout_ms", "must be at least 50"));
        }
        if c.cluster_id.is_empty() {
            return Err(invalid("cluster.cluster_id", "must not be empty"));
        }
        match self.auth.algorithm {
            JwtAlgorithm::Hs256 => {
                if self.auth.secret.as_ref().is_some_and(|s| s.len() < 16) {
                    return Err(invalid("auth.secret", "must be at least 16 bytes"));
                }
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                if self.auth.public_key_file.is_none() {
                    return Err(invalid("auth.public_key_file", "is required for RS256 and EdDSA"));
                }
            }
        }
        self.auth.validate_keys()?;
        Ok(())
    }

    /// The defaults as a commented TOML document (`switchboard print-config`).
    #[must_use]
    pub fn default_toml() -> String {
        let d = Self::default();
        let l = &d.limits;
        format!(
            r#"# Switchboard configuration. Every key is optional; shown are the defaults.
# Precedence: --set section.key=value > other command-line flags > SWITCHBOARD_* environment
# variables (the dedicated ones such as SWITCHBOARD_SHARDS, and SWITCHBOARD_<SECTION>__<KEY>,
# e.g. SWITCHBOARD_LIMITS__SEND_RATE_PER_SEC=50) > this file > defaults.

[server]
# Binary protocol listener (TCP). Port 0 picks a free port, printed in the ready line.
listen = "{listen}"
# Shards (threads with their own event loop); 0 = one per core.
shards = {shards}
# A connection must send Hello within this many milliseconds.
hello_timeout_ms = {hello}
# Announced to clients: ping this often when idle.
heartbeat_interval_ms = {hb}
# Close a connection that sent nothing for this long. This is also the presence TTL: a
# half-open connection shows offline once it passes.
idle_timeout_ms = {idle}
# Time budget for a graceful shutdown.
shutdown_timeout_ms = {shutdown}

[http]
# HTTP listener: /ws (WebSocket bridge), /metrics, /healthz, /readyz, the demo page at /.
listen = "{http_listen}"
# Origins allowed to open a WebSocket, e.g. ["https://chat.example.com"]; "*" allows any.
# Empty: only the broker's own origin (and clients that send no Origin header).
allowed_origins = []
# Serve POST /dev/token for the demo page, but only while every listener is on loopback and
# the generated local secret is in use.
dev_tokens = {dev_tokens}
# Bearer token of the admin API under /admin/ (sessions, conversations, stats, cluster
# operations; docs/operations.md); unset: the API is off.
# admin_token = "at least 16 bytes"

[storage]
# Database directory (also holds the generated jwt.secret).
data_dir = "{data_dir}"
# sync: ack after fsync (group commit) | interval:<ms>: ack after the OS has it, fsync every <ms>
# | buffered: never fsync (benchmarks only).
durability = "{durability}"
# Block cache in MiB.
cache_mb = {cache}
# Free space (MiB) to keep on the data directory's file system: below it, sends and
# conversation changes are refused with STORAGE_FULL until space returns. 0: no check.
min_free_mb = {min_free}
# Journal size (MiB, at least 64) that makes the store flush memtables and drop old journal
# files: bounds crash-recovery replay time and the journal's disk use.
max_journal_mb = {max_journal}
# Memtable size (MiB) per keyspace (nine keyspaces): memory for writes not yet in table files.
# Set when the data directory is created; later changes are ignored (with a warning).
memtable_mb = {memtable}

[limits]
max_frame_bytes = {frame}
max_body_bytes = {body}
# Outstanding requests per connection before the broker stops reading from it.
max_inflight = {inflight}
# Bytes queued toward one connection before it is cut off as a slow consumer.
outbound_queue_bytes = {outq}
max_group_members = {group}
max_members_per_request = {per_req}
max_history_limit = {hist}
max_sync_limit = {sync}
# Per-user rates (GCRA): sustained per second, and the burst allowed on top.
send_rate_per_sec = {send_rate}
send_burst = {send_burst}
typing_rate_per_sec = {typing_rate}
typing_burst = {typing_burst}
receipt_rate_per_sec = {receipt_rate}
receipt_burst = {receipt_burst}
# New connections per second from one IP address, and the burst.
connect_rate_per_ip = {conn_rate}
connect_burst_per_ip = {conn_burst}
# Concurrent sessions (devices) per user.
max_connections_per_user = {max_conns}
# Open client connections (TCP and WebSocket) in all, and from one IP address (0: no cap;
# clients behind one NAT share an address, so set it only facing the internet directly).
max_connections = {max_total}
max_connections_per_ip = {max_per_ip}
# A user in this many conversations cannot create another.
max_conversations_per_user = {max_convs}
# Users per PresenceQuery / PresenceSubscribe, and presence subscriptions per session.
max_presence_users = {presence_users}
max_presence_subscriptions = {presence_subs}

[auth]
# HS256 (shared secret), RS256 or EdDSA (public_key_file).
algorithm = "HS256"
# secret = "at least 16 bytes"      # default: generated into <data_dir>/jwt.secret
# secret_file = "/etc/switchboard/jwt.secret"
# public_key_file = "/etc/switchboard/jwt.pub.pem"
# audience = "my-app"
# issuer = "https://auth.example.com"
# Clock skew tolerated on exp and nbf; a session is closed once its token's exp plus this
# passes (unless the client sent RefreshToken).
leeway_secs = {leeway}
# Named keys, for key rotation: a token whose header has a `kid` is verified with that key
# only (an unknown kid is rejected); tokens without a kid use the key above. Without named
# keys, the key above verifies every token whatever its kid. With named keys, the key above
# is used only if its secret, secret_file or public_key_file is set.
# [[auth.keys]]
# kid = "2026-01"
# algorithm = "RS256"               # HS256 (secret or secret_file), RS256 or EdDSA
# public_key_file = "/etc/switchboard/jwt-2026-01.pub.pem"

[presence]
# A user whose only session drops and comes back within this time does not flap offline.
grace_ms = {grace}
# A typing indicator shows this long unless renewed.
typing_expires_ms = {typing_expires}
# Changed last-seen times are written in batches this often.
last_seen_flush_ms = {last_seen_flush}

[push]
# POST a signed JSON notification here for messages to users with no online session.
# webhook_url = "https://push.example.com/switchboard"
# secret = "at least 16 bytes"       # HMAC-SHA256 key of the X-Switchboard-Signature header
# Messages within this window become one notification per conversation.
window_ms = {window}
# Conversations with more members do not notify.
max_group_size = {max_group}
# Delivery attempts (with exponential backoff) before a notification is dropped.
max_attempts = {attempts}
timeout_ms = {timeout}

[cluster]
# Gossip (UDP) address; clustering is off while unset. E.g. "127.0.0.1:7402".
# listen = "127.0.0.1:7402"
# Address peers reach this node at, if not `listen` (required when listen is 0.0.0.0).
# advertise = "10.0.0.5:7402"
# Gossip addresses of nodes to join through; empty: this node founds the cluster.
seeds = []
# Nodes gossip only within one cluster id.
cluster_id = "{cluster_id}"
# Unique node id; default: generated on the first start, kept in <data_dir>/cluster/node_id.
# node_id = 1
gossip_interval_ms = {gossip_interval}
# Failure detector (phi accrual): higher suspects a silent node later.
phi_threshold = {phi:?}
# A node suspected down for this long is forgotten.
dead_node_grace_ms = {dead_grace}
# Replicas per partition. With fewer nodes, node loss is not survivable. With more nodes than
# replicas, nodes read and follow the partitions they do not hold through other nodes, with
# the limits docs/cluster.md lists; as many nodes as replicas (3, or 5 with replication = 5)
# avoids them.
replication = {replication}
# The control plane (Raft) is founded once this many nodes are live; use 1 for a one-node
# cluster. Nodes that come later join it.
bootstrap_expect = {bootstrap_expect}
# Control plane election timeout: a failed control leader is replaced within 1-2 of these.
election_timeout_ms = {election}
# Applied replication log entries per partition kept in memory; older payloads are read back
# from disk for a replica that lags further.
log_memory_entries = {log_memory}
# Anti-entropy: every this often a node compares the partitions it follows with their leaders
# and pulls committed messages it lacks. 0 turns it off.
anti_entropy_interval_ms = {anti_entropy}
"#,
            listen = d.server.listen,
            shards = d.server.shards,
            hello = d.server.hello_timeout_ms,
            hb = d.server.heartbeat_interval_ms,
            idle = d.server.idle_timeout_ms,
            shutdown = d.server.shutdown_timeout_ms,
            http_listen = d.http.listen,
            dev_tokens = d.http.dev_tokens,
            data_dir = d.storage.data_dir.display(),
            durability = d.storage.durability,
            cache = d.storage.cache_mb,
            min_free = d.storage.min_free_mb,
            max_journal = d.storage.max_journal_mb,
            memtable = d.storage.memtable_mb,
            frame = l.max_frame_bytes,
            body = l.max_body_bytes,
            inflight = l.max_inflight,
            outq = l.outbound_queue_bytes,
            group = l.max_group_members,
            per_req = l.max_members_per_request,
            hist = l.max_history_limit,
            sync = l.max_sync_limit,
            send_rate = l.send_rate_per_sec,
            send_burst = l.send_burst,
            typing_rate = l.typing_rate_per_sec,
            typing_burst = l.typing_burst,
            receipt_rate = l.receipt_rate_per_sec,
            receipt_burst = l.receipt_burst,
            conn_rate = l.connect_rate_per_ip,
            conn_burst = l.connect_burst_per_ip,
            max_conns = l.max_connections_per_user,
            max_total = l.max_connections,
            max_per_ip = l.max_connections_per_ip,
            max_convs = l.max_conversations_per_user,
            presence_users = l.max_presence_users,
            presence_subs = l.max_presence_subscriptions,
            leeway = d.auth.leeway_secs,
            grace = d.presence.grace_ms,
            typing_expires = d.presence.typing_expires_ms,
            last_seen_flush = d.presence.last_seen_flush_ms,
            window = d.push.window_ms,
            max_group = d.push.max_group_size,
            attempts = d.push.max_attempts,
            timeout = d.push.timeout_ms,
            cluster_id = d.cluster.cluster_id,
            gossip_interval = d.cluster.gossip_interval_ms,
            phi = d.cluster.phi_threshold,
            dead_grace = d.cluster.dead_node_grace_ms,
            replication = d.cluster.replication,
            bootstrap_expect = d.cluster.bootstrap_expect,
            election = d.cluster.election_timeout_ms,
            log_memory = d.cluster.log_memory_entries,
            anti_entropy = d.cluster.anti_entropy_interval_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_defaults_should_validate() {
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn given_printed_defaults_when_parsed_should_equal_defaults() {
        assert_eq!(Config::from_toml(&Config::default_toml()), Ok(Config::default()));
    }

    #[test]
    fn given_printed_defaults_should_mention_every_key() {
        let printed = Config::default_toml();
        let all = toml::to_string(&Config::default()).unwrap();
        for line in all.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(printed.contains(&format!("{key} = ")), "print-config lacks `{key}`");
        }
    }

    #[test]
    fn given_assignments_should_override_the_file_and_name_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[limits]\nsend_rate_per_sec = 5\n").unwrap();
        let set = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let c = Config::load(
            Some(&file),
            &[set("limits.send_burst", "7"), set("push.webhook_url", "http://x/y")],
        )
        .unwrap();
        assert_eq!((c.limits.send_rate_per_sec, c.limits.send_burst), (5, 7));
        assert_eq!(c.push.webhook_url.as_deref(), Some("http://x/y"));
        let err = Config::load(None, &[set("limits.send_rate", "1")]).unwrap_err().to_string();
        assert!(err.contains("send_rate"), "{err}");
        let err =
            Config::load(None, &[set("limits.send_burst", "\"many\"")]).unwrap_err().to_string();
        assert!(err.contains("send_burst"), "{err}");
    }

    #[test]
    fn given_assign_after_overrides_should_win() {
        let mut c = Config::default();
        c.apply(Overrides { shards: Some(3), ..Default::default() });
        let c = c.assign(&[("server.shards".to_owned(), "4".to_owned())]).unwrap();
        assert_eq!(c.server.shards, 4);
        assert_eq!(c.storage.durability, Durability::Sync, "untouched keys survive the round trip");
    }

    #[test]
    fn rejects_webhook_without_secret() {
        let mut c = Config::default();
        c.push.webhook_url = Some("http://127.0.0.1:9/hook".into());
        assert!(c.validate().unwrap_err().to_string().contains("push.secret"));
    }

    #[test]
    fn given_a_short_admin_token_should_reject_it_naming_the_key() {
        let mut c = Config::default();
        c.http.admin_token = Some("short".into());
        assert!(c.validate().unwrap_err().to_string().contains("http.admin_token"));
        c.http.admin_token = Some("a-long-enough-admin-token".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn rejects_unknown_keys_naming_them() {
        let err = Config::from_toml("[server]\nlisten_addr = \"1.2.3.4:1\"\n").unwrap_err();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn rejects_bad_durability() {
        let err = Config::from_toml("[storage]\ndurability = \"often\"\n").unwrap_err();
        assert!(err.contains("often"), "{err}");
        assert!("interval:0".parse::<Durability>().is_err());
        assert_eq!("interval:5".parse(), Ok(Durability::Interval(Duration::from_millis(5))));
    }

    #[test]
    fn rejects_body_limit_above_frame_limit() {
        let mut c = Config::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_body_bytes"), "{err}");
    }

    #[test]
    fn rejects_public_key_algorithm_without_key() {
        let mut c = Config::default();
        c.auth.algorithm = JwtAlgorithm::Rs256;
        assert!(c.validate().unwrap_err().to_string().contains("auth.public_key_file"));
    }

    fn key(kid: &str, algorithm: JwtAlgorithm) -> KeyConfig {
        KeyConfig {
            kid: kid.into(),
            algorithm,
            secret: None,
            secret_file: None,
            public_key_file: None,
        }
    }

    #[test]
    fn given_bad_named_keys_should_reject_them_naming_the_key() {
        let mut c = Config::default();
        let good =
            KeyConfig { secret: Some("0123456789abcdef".into()), ..key("a", JwtAlgorithm::Hs256) };
        c.auth.keys = vec![good.clone()];
        c.validate().expect("one good named key");
        for (keys, names) in [
            (vec![good.clone(), good.clone()], "auth.keys[kid = \"a\"].kid"),
            (vec![key("b", JwtAlgorithm::Hs256)], "auth.keys[kid = \"b\"].secret"),
            (vec![key("c", JwtAlgorithm::Rs256)], "auth.keys[kid = \"c\"].public_key_file"),
            (
                vec![KeyConfig { secret: Some("short".into()), ..key("d", JwtAlgorithm::Hs256) }],
                "auth.keys[kid = \"d\"].secret",
            ),
            (vec![key("", JwtAlgorithm::Hs256)], "auth.keys.kid"),
        ] {
            c.auth.keys = keys;
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(names), "{err} should name {names}");
        }
    }

    #[test]
    fn given_named_keys_should_parse_round_trip_and_turn_dev_tokens_off() {
        let text = "[auth]\nsecret = \"0123456789abcdef\"\n\n[[auth.keys]]\nkid = \"2026-01\"\n\
                    algorithm = \"EdDSA\"\npublic_key_file = \"/k.pem\"\n";
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.auth.keys.len(), 1);
        assert_eq!(c.auth.keys[0].algorithm, JwtAlgorithm::EdDsa);
        assert_eq!(Config::from_toml(&toml::to_string(&c).unwrap()), Ok(c.clone()));
        let mut only_named = Config::default();
        only_named.auth.keys = c.auth.keys.clone();
        assert!(!only_named.auth.unnamed_key_in_use());
        assert!(only_named.dev_tokens().is_err());
        assert!(c.auth.unnamed_key_in_use());
    }

    #[test]
    fn rejects_heartbeat_not_below_idle_timeout() {
        let mut c = Config::default();
        c.server.heartbeat_interval_ms = c.server.idle_timeout_ms;
        assert!(c.validate().unwrap_err().to_string().contains("heartbeat_interval_ms"));
    }

    #[test]
    fn given_overrides_should_win_over_file_values() {
        let mut c = Config::from_toml("[storage]\ndurability = \"buffered\"\n").unwrap();
        c.apply(Overrides {
            durability: Some(Durability::Sync),
            shards: Some(3),
            ..Default::default()
        });
        assert_eq!(c.storage.durability, Durability::Sync);
        assert_eq!(c.server.shards, 3);
    }
}
