//! Command-line options.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Load generator for Switchboard, and for NATS and Redis in side-by-side runs.
///
/// Every scenario reports throughput (sent, acknowledged, delivered per second), send→ack and
/// send→delivery latency percentiles from HdrHistograms (measured from the intended send time,
/// so queueing is not hidden), errors by code, and, when the broker runs on this machine, its
/// CPU-seconds per million messages.
#[derive(Debug, Parser)]
#[command(name = "switchboard-loadgen", version, about, long_about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N two-person conversations, messages back and forth.
    Direct {
        /// Conversations (each has two connections, both sending).
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Options every scenario takes.
        #[command(flatten)]
        common: Common,
    },
    /// Publishers sending into rooms of M members (fan-out).
    Room {
        /// Members per room (each a connection).
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Publishers per room (the first members).
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Rooms.
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Options every scenario takes.
        #[command(flatten)]
        common: Common,
    },
    /// Opens and holds idle, authenticated connections; reports broker memory per connection.
    Connect {
        /// Connections to hold.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Options every scenario takes.
        #[command(flatten)]
        common: Common,
    },
    /// Users in direct conversations whose connections drop and come back at a given rate:
    /// each client reconnects, resumes, syncs what it missed and re-sends what was not
    /// acknowledged. Reports reconnect time, messages recovered by resync, and checks that
    /// nothing acknowledged is missing or out of order. Switchboard only (Rust client).
    Churn {
        /// Users (one connection each), paired into direct conversations.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Connections dropped per second.
        #[arg(long, default_value_t = 20.0)]
        churn_rate: f64,
        /// How long a dropped user stays offline.
        #[arg(long, default_value = "1s", value_parser = duration)]
        offline: Duration,
        /// Options every scenario takes (--rate defaults to 1 message/s per user; the run is
        /// always open loop).
        #[command(flatten)]
        common: Common,
    },
    /// A chat-shaped mix through the Rust client: direct conversations and groups of
    /// Zipf-distributed size, typing indicators, read receipts (delivered receipts are
    /// automatic), presence subscriptions, optionally churn. Switchboard only.
    Chat {
        /// Users (one connection each).
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Direct conversations per user.
        #[arg(long, default_value_t = 3)]
        directs: usize,
        /// Groups (default: one per 10 users).
        #[arg(long)]
        groups: Option<usize>,
        /// Largest group.
        #[arg(long, default_value_t = 200)]
        max_group: usize,
        /// Zipf exponent of group sizes (larger: more small groups).
        #[arg(long, default_value_t = 2.0)]
        zipf: f64,
        /// Share of a group member's messages that go to its groups.
        #[arg(long, default_value_t = 0.3)]
        group_share: f64,
        /// Probability that a message is preceded by a typing indicator.
        #[arg(long, default_value_t = 0.5)]
        typing: f64,
        /// How often each user marks what it received as read (0 = never).
        #[arg(long, default_value = "2s", value_parser = duration)]
        read_every: Duration,
        /// Other users whose presence each user follows.
        #[arg(long, default_value_t = 5)]
        presence: usize,
        /// Connections dropped per second (0 = none).
        #[arg(long, default_value_t = 0.0)]
        churn_rate: f64,
        /// How long a dropped user stays offline.
        #[arg(long, default_value = "1s", value_parser = duration)]
        offline: Duration,
        /// Options every scenario takes (--rate defaults to 0.2 messages/s per user, a message
        /// every 5 s; the run is always open loop).
        #[command(flatten)]
        common: Common,
    },
}

impl Scenario {
    /// The options every scenario takes.
    #[must_use]
    pub fn common(&self) -> &Common {
        match self {
            Self::Direct { common, .. }
            | Self::Room { common, .. }
            | Self::Connect { common, .. }
            | Self::Churn { common, .. }
            | Self::Chat { common, .. } => common,
        }
    }
}

/// Options every scenario takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// The system under test: switchboard://HOST:PORT (binary protocol over TCP), ws://HOST:PORT
    /// (Switchboard's WebSocket bridge, binary subprotocol), nats://HOST:PORT (NATS core),
    /// nats+js://HOST:PORT (NATS JetStream, file storage), redis://HOST:PORT (pub/sub),
    /// redis+stream://HOST:PORT (XADD to streams, read with XREAD).
    #[arg(long, default_value = "switchboard://127.0.0.1:7400")]
    pub target: String,
    /// Switchboard's HS256 secret (default: read from DATA_DIR/jwt.secret).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The broker's data directory, for its generated secret.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Offered load in messages per second over all senders (open loop). Without it the run is
    /// closed loop with --in-flight sends outstanding per sender.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sends outstanding per sender in closed loop.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Measurement time, e.g. 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub warmup: Duration,
    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Local addresses to connect from, e.g. 127.0.0.2-127.0.0.40 (for more than ~28k
    /// connections to one port).
    #[arg(long, value_parser = ip_range)]
    pub source_ips: Option<SourceIps>,
    /// Connections opened concurrently while setting up.
    #[arg(long, default_value_t = 128)]
    pub connect_parallelism: usize,
    /// The broker's process id, for CPU and memory (default: the local process listening on
    /// the target's port, when there is one).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency and throughput chart (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar (e.g. in scripts).
    #[arg(long)]
    pub no_progress: bool,
}

/// A list of source addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIps(pub Vec<IpAddr>);

/// Parses `10s`, `500ms`, `2m`.
///
/// # Errors
/// When the text is not a duration.
pub fn duration(s: &str) -> Result<Duration, String> {
    let (n, unit) =
        s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = n.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `A` or `A-B` (IPv4, inclusive).
///
/// # Errors
/// When the text is not an address or a range.
pub fn ip_range(s: &str) -> Result<SourceIps, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("invalid address {a:?}"))?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("invalid address {b:?}"))?;
    let (a, b) = (u32::from(a), u32::from(b));
    if b < a || b - a > 65_536 {
        return Err(format!("invalid range {s:?}"));
    }
    Ok(SourceIps((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_durations_and_ranges_should_parse() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("3h").is_err());
        let r = ip_range("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(r.0.len(), 3);
        assert!(ip_range("127.0.0.4-127.0.0.2").is_err());
    }

    #[test]
    fn given_cli_definition_should_be_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
