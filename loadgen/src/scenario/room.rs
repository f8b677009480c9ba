//! `room`: publishers send into rooms of M members; every other member receives every message.

use crate::report::Report;
use crate::runner::{Client, connect_all, drive};
use crate::scenario::Ctx;
use crate::target::{Connection, Target};

/// Runs the scenario.
///
/// # Errors
/// When connecting or setting up fails.
pub async fn run<T: Target>(
    target: &T,
    ctx: &Ctx,
    members: usize,
    publishers: usize,
    rooms: usize,
) -> anyhow::Result<Report> {
    let (members, rooms) = (members.max(2), rooms.max(1));
    let publishers = publishers.clamp(1, members);
    let user = |i: usize| format!("{}-r{}-m{}", ctx.run, i / members, i % members);
    let mut conns =
        connect_all(target, members * rooms, user, &ctx.sources(), ctx.common.connect_parallelism)
            .await?;
    let mut channels = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let names: Vec<String> = (0..members).map(|j| user(r * members + j)).collect();
        let owner =
            conns.get_mut(r * members).ok_or_else(|| anyhow::anyhow!("missing connection"))?;
        let ch = target.room(owner, &names[0], &names).await?;
        for j in 0..members {
            if let Some(c) = conns.get_mut(r * members + j) {
                c.join(&ch).await?;
            }
        }
        channels.push(ch);
    }
    let clients = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            let sends = i % members < publishers;
            Client {
                conn,
                index: i as u64,
                sends_to: sends.then(|| channels.get(i / members).cloned()).flatten(),
            }
        })
        .collect();
    let m = drive(target, &ctx.shared, clients, &ctx.load(), ctx.broker_pid).await;
    Ok(Report::new(
        "room",
        format!("{} {}", target.name(), ctx.common.target),
        ctx.parameters(&[
            ("members", members.to_string()),
            ("publishers", publishers.to_string()),
            ("rooms", rooms.to_string()),
        ]),
        &m,
        ctx.shared.errors(),
    ))
}
