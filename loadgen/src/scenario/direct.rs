//! `direct`: N two-person conversations; both members send, each receives the other's messages.

use crate::report::Report;
use crate::runner::{Client, connect_all, drive};
use crate::scenario::Ctx;
use crate::target::{Connection, Target};

/// Runs the scenario.
///
/// # Errors
/// When connecting or setting up fails.
pub async fn run<T: Target>(target: &T, ctx: &Ctx, pairs: usize) -> anyhow::Result<Report> {
    let pairs = pairs.max(1);
    let user =
        |i: usize| format!("{}-{}{}", ctx.run, if i.is_multiple_of(2) { "a" } else { "b" }, i / 2);
    let mut conns =
        connect_all(target, 2 * pairs, user, &ctx.sources(), ctx.common.connect_parallelism)
            .await?;
    let mut channels = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (a, b) = (user(2 * i), user(2 * i + 1));
        let conn = conns.get_mut(2 * i).ok_or_else(|| anyhow::anyhow!("missing connection"))?;
        let ch = target.direct(conn, &a, &b).await?;
        for k in [2 * i, 2 * i + 1] {
            if let Some(c) = conns.get_mut(k) {
                c.join(&ch).await?;
            }
        }
        channels.push(ch);
    }
    let clients = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| Client { conn, index: i as u64, sends_to: channels.get(i / 2).cloned() })
        .collect();
    let m = drive(target, &ctx.shared, clients, &ctx.load(), ctx.broker_pid).await;
    Ok(Report::new(
        "direct",
        format!("{} {}", target.name(), ctx.common.target),
        ctx.parameters(&[("pairs", pairs.to_string())]),
        &m,
        ctx.shared.errors(),
    ))
}
