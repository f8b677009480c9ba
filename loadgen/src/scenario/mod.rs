//! The scenarios. Each sets up users and channels on a [`Target`], then hands the clients to
//! [`crate::runner::drive`].

pub mod chat;
pub mod connect;
pub mod direct;
pub mod room;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cli::{Common, Scenario};
use crate::report::Report;
use crate::runner::Load;
use crate::stats::Shared;
use crate::target::Target;

/// Everything a scenario needs besides its own options.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Shared counters and histograms.
    pub shared: Arc<Shared>,
    /// The common options.
    pub common: Common,
    /// A prefix that makes this run's user names unique.
    pub run: String,
    /// The broker process, when local.
    pub broker_pid: Option<u32>,
}

impl Ctx {
    /// The load as the options describe it.
    #[must_use]
    pub fn load(&self) -> Load {
        Load {
            rate: self.common.rate,
            in_flight: self.common.in_flight,
            payload: self.common.payload.max(crate::target::HEADER),
            duration: self.common.duration,
            warmup: self.common.warmup,
            progress: !self.common.no_progress,
        }
    }

    /// Source addresses to connect from.
    #[must_use]
    pub fn sources(&self) -> Vec<std::net::IpAddr> {
        self.common.source_ips.as_ref().map(|s| s.0.clone()).unwrap_or_default()
    }

    /// The run parameters for the report.
    #[must_use]
    pub fn parameters(&self, extra: &[(&str, String)]) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        match self.common.rate {
            Some(r) => p.insert("rate".into(), format!("{r}")),
            None => p.insert("in_flight".into(), self.common.in_flight.to_string()),
        };
        p.insert("payload".into(), self.common.payload.to_string());
        p.insert("duration".into(), format!("{:?}", self.common.duration));
        for (k, v) in extra {
            p.insert((*k).to_owned(), v.clone());
        }
        p
    }
}

/// Runs `scenario` against Switchboard: every scenario, including those that use its chat
/// features (presence, typing, receipts, resync).
///
/// # Errors
/// When connecting or setting up fails.
pub async fn run_switchboard(
    target: &crate::target::switchboard::Switchboard,
    scenario: &Scenario,
    ctx: &Ctx,
) -> anyhow::Result<Report> {
    let rate = |per_user: f64, users: usize| ctx.common.rate.unwrap_or(per_user * users as f64);
    match scenario {
        Scenario::Churn { users, churn_rate, offline, .. } => {
            let plan = chat::Plan {
                name: "churn",
                users: *users,
                directs: 1,
                groups: 0,
                max_group: 2,
                zipf: 1.0,
                group_share: 0.0,
                typing: 0.0,
                read_every: None,
                presence: 0,
                churn_rate: *churn_rate,
                offline: *offline,
                rate: rate(1.0, *users),
            };
            chat::run(target, ctx, &plan).await
        }
        Scenario::Chat {
            users,
            directs,
            groups,
            max_group,
            zipf,
            group_share,
            typing,
            read_every,
            presence,
            churn_rate,
            offline,
            ..
        } => {
            let plan = chat::Plan {
                name: "chat",
                users: *users,
                directs: *directs,
                groups: groups.unwrap_or(users / 10),
                max_group: *max_group,
                zipf: *zipf,
                group_share: group_share.clamp(0.0, 1.0),
                typing: typing.clamp(0.0, 1.0),
                read_every: (!read_every.is_zero()).then_some(*read_every),
                presence: *presence,
                churn_rate: *churn_rate,
                offline: *offline,
                rate: rate(0.2, *users),
            };
            chat::run(target, ctx, &plan).await
        }
        _ => run(target, scenario, ctx).await,
    }
}

/// Runs `scenario` against any `target` (the scenarios with equivalent semantics on every
/// system: direct, room, connect).
///
/// # Errors
/// When connecting or setting up fails.
pub async fn run<T: Target>(target: &T, scenario: &Scenario, ctx: &Ctx) -> anyhow::Result<Report> {
    match scenario {
        Scenario::Direct { pairs, .. } => direct::run(target, ctx, *pairs).await,
        Scenario::Room { members, publishers, rooms, .. } => {
            room::run(target, ctx, *members, *publishers, *rooms).await
        }
        Scenario::Connect { connections, .. } => connect::run(target, ctx, *connections).await,
        Scenario::Churn { .. } | Scenario::Chat { .. } => anyhow::bail!(
            "the churn and chat scenarios use Switchboard's chat features (target switchboard:// \
             or ws://)"
        ),
    }
}
