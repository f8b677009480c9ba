//! `connect`: opens and holds idle, authenticated connections (pinging within the idle
//! timeout) and reports the broker's memory per connection.

use std::time::Duration;

use crate::report::Report;
use crate::runner::{Client, connect_all, drive};
use crate::scenario::Ctx;
use crate::target::Target;

/// Runs the scenario.
///
/// # Errors
/// When connecting fails.
pub async fn run<T: Target>(target: &T, ctx: &Ctx, connections: usize) -> anyhow::Result<Report> {
    let before = ctx.broker_pid.and_then(crate::procstat::usage);
    let user = |i: usize| format!("{}-idle{i}", ctx.run);
    let started = std::time::Instant::now();
    let conns =
        connect_all(target, connections, user, &ctx.sources(), ctx.common.connect_parallelism)
            .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the broker settle (allocator, deferred frees) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = ctx.broker_pid.and_then(crate::procstat::usage);
    let clients = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| Client { conn, index: i as u64, sends_to: None })
        .collect();
    let m = drive(target, &ctx.shared, clients, &ctx.load(), ctx.broker_pid).await;
    let mut report = Report::new(
        "connect",
        format!("{} {}", target.name(), ctx.common.target),
        ctx.parameters(&[("connections", connections.to_string())]),
        &m,
        ctx.shared.errors(),
    );
    report.extra.insert("connections".into(), connections as f64);
    report.extra.insert("connect_per_sec".into(), connections as f64 / connect_secs.max(1e-9));
    if let (Some(a), Some(b)) = (before, held) {
        let per = (b.rss_bytes.saturating_sub(a.rss_bytes)) as f64 / connections.max(1) as f64;
        report.extra.insert("broker_bytes_per_connection".into(), per);
    }
    Ok(report)
}
