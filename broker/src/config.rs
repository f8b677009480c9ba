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
        key: &'static str,
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
    /// Data directory and durability.
    pub storage: StorageConfig,
    /// Per-connection and per-request limits.
    pub limits: LimitsConfig,
    /// Token verification.
    pub auth: AuthConfig,
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

/// `[storage]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the database and the generated token secret. Default `./data`.
    pub data_dir: PathBuf,
    /// When a send is acknowledged: `sync` (after fsync, the default), `interval:<ms>` (after
    /// the write reached the OS; fsync every <ms>), or `buffered` (no fsync; benchmarks only).
    pub durability: Durability,
    /// Block cache size in MiB. Default 64.
    pub cache_mb: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("./data"), durability: Durability::Sync, cache_mb: 64 }
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
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30.
    pub leeway_secs: u64,
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
}

impl Config {
    /// Reads a TOML file; unknown keys and bad values are errors naming the key.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text)
            .map_err(|message| ConfigError::Parse { path: path.to_owned(), message })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// The parser's message when the text is invalid.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
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
            ConfigError::Invalid { key, message: message.into() }
        }
        let l = &self.limits;
        let s = &self.server;
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
        Ok(())
    }

    /// The defaults as a commented TOML document (`switchboard print-config`).
    #[must_use]
    pub fn default_toml() -> String {
        let d = Self::default();
        format!(
            r#"# Switchboard configuration. Every key is optional; shown are the defaults.
# Precedence: command-line flags > SWITCHBOARD_* environment variables > this file > defaults.

[server]
# Binary protocol listener (TCP). Port 0 picks a free port, printed in the ready line.
listen = "{listen}"
# Shards (threads with their own event loop); 0 = one per core.
shards = {shards}
# A connection must send Hello within this many milliseconds.
hello_timeout_ms = {hello}
# Announced to clients: ping this often when idle.
heartbeat_interval_ms = {hb}
# Close a connection that sent nothing for this long.
idle_timeout_ms = {idle}
# Time budget for a graceful shutdown.
shutdown_timeout_ms = {shutdown}

[storage]
# Database directory (also holds the generated jwt.secret).
data_dir = "{data_dir}"
# sync: ack after fsync (group commit) | interval:<ms>: ack after the OS has it, fsync every <ms>
# | buffered: never fsync (benchmarks only).
durability = "{durability}"
# Block cache in MiB.
cache_mb = {cache}

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

[auth]
# HS256 (shared secret), RS256 or EdDSA (public_key_file).
algorithm = "HS256"
# secret = "at least 16 bytes"      # default: generated into <data_dir>/jwt.secret
# secret_file = "/etc/switchboard/jwt.secret"
# public_key_file = "/etc/switchboard/jwt.pub.pem"
# audience = "my-app"
# issuer = "https://auth.example.com"
leeway_secs = {leeway}
"#,
            listen = d.server.listen,
            shards = d.server.shards,
            hello = d.server.hello_timeout_ms,
            hb = d.server.heartbeat_interval_ms,
            idle = d.server.idle_timeout_ms,
            shutdown = d.server.shutdown_timeout_ms,
            data_dir = d.storage.data_dir.display(),
            durability = d.storage.durability,
            cache = d.storage.cache_mb,
            frame = d.limits.max_frame_bytes,
            body = d.limits.max_body_bytes,
            inflight = d.limits.max_inflight,
            outq = d.limits.outbound_queue_bytes,
            group = d.limits.max_group_members,
            per_req = d.limits.max_members_per_request,
            hist = d.limits.max_history_limit,
            sync = d.limits.max_sync_limit,
            leeway = d.auth.leeway_secs,
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
