//! # switchboard-loadgen
//!
//! The library behind the `switchboard-loadgen` binary (also used by the end-to-end smoke
//! tests).
//!
//! ## Layout
//! - `cli`: options; `scenario/`: direct, room, connect (set-up per scenario);
//! - `runner`: senders (open and closed loop), readers, warm-up and measurement, progress;
//! - `target/`: what is measured: Switchboard (TCP, WebSocket), NATS, Redis;
//! - `stats`, `report`, `procstat`: counters, HdrHistograms, tables, JSON, SVG, `/proc`.

pub mod cli;
pub mod procstat;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};

use cli::{Cli, Common};
pub use report::Report;
pub use scenario::Ctx;
use target::switchboard::{Switchboard, Transport};

fn secret(common: &Common) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &common.secret {
        return Ok(s.as_bytes().to_vec());
    }
    let path = common.data_dir.join("jwt.secret");
    let bytes = std::fs::read(&path).with_context(|| {
        format!("reading the broker's secret from {} (pass --secret or --data-dir)", path.display())
    })?;
    Ok(bytes.trim_ascii().to_vec())
}

fn addr(rest: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    rest.trim_end_matches('/')
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("cannot resolve {rest}"))
}

/// Runs the scenario the command line names and returns its report.
///
/// # Errors
/// When the target cannot be reached or set up.
pub async fn run(cli: Cli) -> anyhow::Result<Report> {
    let common = cli.scenario.common().clone();
    // Many connections need many descriptors: raise the hard limit to 2^20 when privileged
    // (never lowering it), then the soft limit as far as the hard one allows.
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && hard < 1 << 20
    {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, 1 << 20, 1 << 20);
    }
    let _ = rlimit::increase_nofile_limit(1 << 20);
    let (scheme, rest) =
        common.target.split_once("://").with_context(|| "target must be SCHEME://HOST:PORT")?;
    let address = addr(rest)?;
    let broker_pid = common.broker_pid.or_else(|| {
        address.ip().is_loopback().then(|| procstat::pid_listening_on(address.port())).flatten()
    });
    let run_id: u32 = rand::random();
    let ctx = Ctx {
        shared: Arc::new(stats::Shared::default()),
        common: common.clone(),
        run: format!("lg{run_id:08x}"),
        broker_pid,
    };
    match scheme {
        "switchboard" | "tcp" => {
            let t = Switchboard::new(address, Transport::Tcp, secret(&common)?);
            scenario::run_switchboard(&t, &cli.scenario, &ctx).await
        }
        "ws" => {
            let t = Switchboard::new(address, Transport::Ws, secret(&common)?);
            scenario::run_switchboard(&t, &cli.scenario, &ctx).await
        }
        #[cfg(feature = "peers")]
        "nats" => {
            let t = target::nats::Nats::new(address, target::nats::Flavour::Core);
            scenario::run(&t, &cli.scenario, &ctx).await
        }
        #[cfg(feature = "peers")]
        "nats+js" => {
            let t = target::nats::Nats::new(address, target::nats::Flavour::JetStream);
            scenario::run(&t, &cli.scenario, &ctx).await
        }
        #[cfg(feature = "peers")]
        "redis" => {
            let t = target::redis::Redis::new(address, target::redis::Mode::PubSub)?;
            scenario::run(&t, &cli.scenario, &ctx).await
        }
        #[cfg(feature = "peers")]
        "redis+stream" => {
            let t = target::redis::Redis::new(address, target::redis::Mode::Stream)?;
            scenario::run(&t, &cli.scenario, &ctx).await
        }
        #[cfg(not(feature = "peers"))]
        "nats" | "nats+js" | "redis" | "redis+stream" => bail!(
            "the {scheme}:// target needs the NATS and Redis drivers, which this build lacks: \
             rebuild with `cargo build --release -p switchboard-loadgen --features peers`"
        ),
        other => bail!("unknown target scheme {other:?}"),
    }
}
