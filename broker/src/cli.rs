//! The `switchboard` command line: run the broker (default), mint a development token, or
//! print the default configuration. Shared by the real binary and the test wrapper, so tests
//! exercise the same path users do.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Durability, JwtAlgorithm, Overrides};

/// Switchboard: a chat and messaging broker.
///
/// Every option can also be set with a SWITCHBOARD_* environment variable (shown in brackets)
/// or in a TOML file given with --config; flags win over the environment, which wins over the
/// file. `switchboard print-config` shows every key with its default.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default when no subcommand is given).
    Run,
    /// Mint an HS256 development token with the broker's secret.
    Token(TokenArgs),
    /// Print the default configuration as commented TOML.
    PrintConfig,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// Validity, e.g. 30s, 15m, 24h, 7d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    ttl: Duration,
    /// Sign with the named HS256 key of this id (`[[auth.keys]]`) and put it in the header;
    /// without it, the unnamed key signs and the token has no `kid`.
    #[arg(long)]
    kid: Option<String>,
}

/// Options of the broker (valid before or after `run`).
#[derive(Debug, Args)]
#[allow(clippy::struct_field_names)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, env = "SWITCHBOARD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Set any configuration key, e.g. `--set limits.send_rate_per_sec=100` (repeatable; see
    /// `print-config`). Environment variables `SWITCHBOARD_<SECTION>__<KEY>` do the same.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE", global = true, value_parser = parse_assignment)]
    set: Vec<(String, String)>,
    /// Binary protocol listener address [default: 127.0.0.1:7400].
    #[arg(long, env = "SWITCHBOARD_LISTEN", global = true)]
    listen: Option<SocketAddr>,
    /// HTTP listener address (WebSocket, metrics, demo) [default: 127.0.0.1:7401].
    #[arg(long, env = "SWITCHBOARD_HTTP_LISTEN", global = true)]
    http_listen: Option<SocketAddr>,
    /// Number of shards; 0 = one per core [default: 0].
    #[arg(long, env = "SWITCHBOARD_SHARDS", global = true)]
    shards: Option<usize>,
    /// Data directory [default: ./data].
    #[arg(long, env = "SWITCHBOARD_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// sync | interval:<ms> | buffered [default: sync].
    #[arg(long, env = "SWITCHBOARD_DURABILITY", global = true)]
    durability: Option<Durability>,
    /// Largest frame in bytes [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES", global = true)]
    max_frame_bytes: Option<usize>,
    /// Largest message body in bytes [default: 65536].
    #[arg(long, env = "SWITCHBOARD_MAX_BODY_BYTES", global = true)]
    max_body_bytes: Option<usize>,
    /// Outstanding requests per connection [default: 256].
    #[arg(long, env = "SWITCHBOARD_MAX_INFLIGHT", global = true)]
    max_inflight: Option<usize>,
    /// Bytes queued toward a connection before it is cut off [default: 4194304].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_BYTES", global = true)]
    outbound_queue_bytes: Option<usize>,
    /// Handshake timeout in ms [default: 5000].
    #[arg(long, env = "SWITCHBOARD_HELLO_TIMEOUT_MS", global = true)]
    hello_timeout_ms: Option<u64>,
    /// Heartbeat interval announced to clients, in ms [default: 15000].
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_INTERVAL_MS", global = true)]
    heartbeat_interval_ms: Option<u64>,
    /// Idle read timeout in ms [default: 30000].
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_MS", global = true)]
    idle_timeout_ms: Option<u64>,
    /// JWT algorithm: HS256 | RS256 | EdDSA [default: HS256].
    #[arg(long, env = "SWITCHBOARD_JWT_ALGORITHM", global = true)]
    jwt_algorithm: Option<JwtAlgorithm>,
    /// HS256 secret (default: generated into <data-dir>/jwt.secret).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", global = true, hide_env_values = true)]
    jwt_secret: Option<String>,
    /// File holding the HS256 secret.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET_FILE", global = true)]
    jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256 / EdDSA.
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY", global = true)]
    jwt_public_key: Option<PathBuf>,
    /// Required `aud` claim.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE", global = true)]
    jwt_audience: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER", global = true)]
    jwt_issuer: Option<String>,
    /// This node's cluster id (unique per node; default: generated once, kept in the data dir).
    #[arg(long, env = "SWITCHBOARD_NODE_ID", global = true)]
    node_id: Option<u64>,
    /// Gossip (UDP) address; enables clustering, e.g. 127.0.0.1:7402.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_LISTEN", global = true)]
    cluster_listen: Option<SocketAddr>,
    /// Gossip addresses of nodes to join through, comma-separated.
    #[arg(long, env = "SWITCHBOARD_SEEDS", global = true, value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    /// Found the cluster's control plane once this many nodes are live [default: 3].
    #[arg(long, env = "SWITCHBOARD_BOOTSTRAP_EXPECT", global = true)]
    bootstrap_expect: Option<usize>,
    /// Log filter (tracing EnvFilter syntax) [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG", global = true)]
    log: Option<String>,
    /// Log format: text | json [default: text].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", global = true)]
    log_format: Option<String>,
}

fn parse_assignment(s: &str) -> Result<(String, String), String> {
    let (k, v) =
        s.split_once('=').ok_or_else(|| format!("expected SECTION.KEY=VALUE, got {s:?}"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

/// `SWITCHBOARD_LIMITS__SEND_RATE_PER_SEC=50` → (`limits.send_rate_per_sec`, `50`).
fn env_assignments() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("SWITCHBOARD_")?;
            let (section, key) = rest.split_once("__")?;
            Some((format!("{}.{}", section.to_ascii_lowercase(), key.to_ascii_lowercase()), v))
        })
        .collect();
    out.sort();
    out
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("invalid duration unit in {s:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

impl RunArgs {
    fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut config = Config::load(self.config.as_deref(), &env_assignments())?;
        config.apply(Overrides {
            listen: self.listen,
            http_listen: self.http_listen,
            shards: self.shards,
            data_dir: self.data_dir.clone(),
            durability: self.durability,
            max_frame_bytes: self.max_frame_bytes,
            max_body_bytes: self.max_body_bytes,
            max_inflight: self.max_inflight,
            outbound_queue_bytes: self.outbound_queue_bytes,
            hello_timeout_ms: self.hello_timeout_ms,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            jwt_algorithm: self.jwt_algorithm,
            jwt_secret: self.jwt_secret.clone(),
            jwt_secret_file: self.jwt_secret_file.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            jwt_audience: self.jwt_audience.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            node_id: self.node_id,
            cluster_listen: self.cluster_listen,
            seeds: self.seeds.clone(),
            bootstrap_expect: self.bootstrap_expect,
        });
        // `--set` comes last: it wins over the dedicated flags and every variable.
        let config = config.assign(&self.set)?;
        config.validate()?;
        Ok(config)
    }
}

/// Default log filter: our own info logs, only warnings from the storage engine.
const DEFAULT_LOG: &str = "info,lsm_tree=warn,fjall=warn,openraft=warn";

fn init_logging(filter: Option<&str>, format: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter.unwrap_or(DEFAULT_LOG))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    // Logs go to stderr; stdout carries only the ready line.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if format == Some("json") { builder.json().try_init() } else { builder.try_init() };
}

/// Runs the command line and returns the process exit code.
#[must_use]
pub fn execute(cli: Cli) -> ExitCode {
    let args = cli.run;
    match cli.command {
        Some(Command::PrintConfig) => {
            print!("{}", Config::default_toml());
            ExitCode::SUCCESS
        }
        Some(Command::Token(t)) => {
            let result = args.load().map_err(|e| e.to_string()).and_then(|config| {
                let minter = crate::auth::Minter::from_config(
                    &config.auth,
                    &config.storage.data_dir,
                    t.kid.as_deref(),
                )
                .map_err(|e| e.to_string())?;
                minter.mint(&t.user, t.ttl).map_err(|e| e.to_string())
            });
            match result {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Run) | None => {
            init_logging(args.log.as_deref(), args.log_format.as_deref());
            let config = match args.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match crate::runtime::run(config) {
                Ok(crate::runtime::Exit::Clean) => ExitCode::SUCCESS,
                Ok(crate::runtime::Exit::StorageFailure) => ExitCode::from(3),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Parses the process arguments and runs. Aborts the process on a panic in any thread: a
/// broker with one dead shard would keep sockets open that nobody serves.
#[must_use]
pub fn main() -> ExitCode {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    // Failpoints from FAILPOINTS (test builds only; see the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let scenario = fail::FailScenario::setup();
    let code = execute(Cli::parse());
    #[cfg(feature = "failpoints")]
    scenario.teardown();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_durations_should_parse_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn given_cli_definition_should_be_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
