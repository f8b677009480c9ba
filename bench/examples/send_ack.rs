//! A quick probe of a running broker: send→ack latency one message at a time, then acked and
//! delivered messages per second with many sends in flight. (The full load generator is
//! `switchboard-loadgen`; this is the rough figure until it exists.)
//!
//! ```text
//! cargo run --release -p switchboard-bench --example send_ack -- --data-dir ./data
//! ```
//! Tokens are minted with the broker's secret from `<data-dir>/jwt.secret`.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use switchboard_client::{Client, Content, Event};

#[derive(Parser)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7400")]
    addr: String,
    /// The broker's data directory (for its token secret).
    #[arg(long, default_value = "./data")]
    data_dir: std::path::PathBuf,
    /// Messages sent one at a time for the latency figure.
    #[arg(long, default_value_t = 2_000)]
    sequential: u64,
    /// Messages sent for the throughput figure.
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    /// Sends in flight during the throughput run.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cfg = switchboard_broker::config::AuthConfig::default();
    let secret = switchboard_broker::auth::hs256_secret(&cfg, &args.data_dir)?;
    let token = |u: &str| switchboard_broker::auth::mint(&secret, u, Duration::from_secs(3600));
    let run = format!("{:x}", Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    let (sender, _) =
        Client::builder(&args.addr).token(token(&format!("probe-a-{run}"))?).connect().await?;
    let (_receiver, mut events) =
        Client::builder(&args.addr).token(token(&format!("probe-b-{run}"))?).connect().await?;
    let conv = sender.create_direct(&format!("probe-b-{run}")).await?.conversation_id;
    let body = "x".repeat(args.payload);

    let mut lat = Histogram::<u64>::new(3)?;
    for _ in 0..args.sequential {
        let t = Instant::now();
        sender.send(&conv, Content::text(body.clone())).await?;
        lat.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
    }
    println!(
        "send→ack, one in flight, {} × {} B: p50 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs",
        args.sequential,
        args.payload,
        us(&lat, 0.5),
        us(&lat, 0.99),
        us(&lat, 0.999),
        lat.max() as f64 / 1000.0
    );

    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(e) = events.next().await {
            if matches!(e, Event::Message(_)) {
                n += 1;
            }
            if n == 1 + args.sequential + args.total {
                break;
            }
        }
        Instant::now()
    });
    let started = Instant::now();
    let acked = futures::stream::iter(0..args.total)
        .map(|_| sender.send(&conv, Content::text(body.clone())))
        .buffer_unordered(args.in_flight)
        .filter(|r| futures::future::ready(r.is_ok()))
        .count()
        .await;
    let ack_secs = started.elapsed().as_secs_f64();
    let delivered_at = counter.await?;
    let deliver_secs = delivered_at.duration_since(started).as_secs_f64();
    println!(
        "throughput, {} in flight: {acked} acked in {ack_secs:.2} s = {:.0} msg/s; all delivered after {deliver_secs:.2} s = {:.0} msg/s",
        args.in_flight,
        acked as f64 / ack_secs,
        args.total as f64 / deliver_secs
    );
    Ok(())
}
