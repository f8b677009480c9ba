//! Partition placement at many cluster sizes: how evenly rendezvous hashing spreads the 1,024
//! partitions, and what one node joining or leaving costs. Pure computation (no broker, no
//! I/O); it uses `switchboard_broker::cluster::placement` exactly as the broker would.
//!
//! ```text
//! cargo run --release -p switchboard-bench --example placement_sim -- --nodes 3,10,50,200
//! cargo run --release -p switchboard-bench --example placement_sim -- --nodes 50 --weights 1,2
//! ```
//!
//! Node ids are `1..=N`; `--weights` is cycled over them (node `i` gets `weights[(i-1) % len]`).
//! A *join* adds one node of the first weight, with `--join-trials` different ids (the mean
//! and range over those trials are printed); a *leave* removes each existing node in turn
//! (mean and range over all of them). "Data copied" assumes data is spread uniformly over
//! partitions: it is replica slots copied over all replica slots after the change.
//!
//! The output is Markdown, ready to paste into `docs/capacity.md`.

use std::time::Instant;

use clap::Parser;
use switchboard_broker::cluster::placement::{
    DEFAULT_REPLICATION, Member, NodeId, PARTITION_COUNT, Placement, PlacementDiff,
};

#[derive(Parser)]
struct Args {
    /// Cluster sizes to simulate, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "3,10,50,200")]
    nodes: Vec<u64>,
    /// Replication factor R.
    #[arg(long, default_value_t = DEFAULT_REPLICATION)]
    replication: usize,
    /// Node weights (capacities, e.g. shard counts), cycled over the nodes.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    weights: Vec<u32>,
    /// How many different ids to try for the joining node.
    #[arg(long, default_value_t = 16)]
    join_trials: u64,
}

/// min, mean, max and coefficient of variation (population standard deviation over mean).
struct Stats {
    min: f64,
    mean: f64,
    max: f64,
    cv: f64,
}

fn stats(xs: &[f64]) -> Stats {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Stats {
        min: xs.iter().copied().fold(f64::INFINITY, f64::min),
        mean,
        max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
    }
}

/// "mean (min–max)" over trials, with `digits` decimals for the mean.
fn range(xs: &[f64], digits: usize) -> String {
    let s = stats(xs);
    if s.min == s.max {
        format!("{:.digits$}", s.mean)
    } else {
        format!("{:.digits$} ({:.0}–{:.0})", s.mean, s.min, s.max)
    }
}

fn pct(xs: &[f64]) -> String {
    let s = stats(xs);
    if (s.max - s.min).abs() < 5e-4 {
        format!("{:.1} %", 100.0 * s.mean)
    } else {
        format!("{:.1} % ({:.1}–{:.1})", 100.0 * s.mean, 100.0 * s.min, 100.0 * s.max)
    }
}

/// Partitions led per node if, instead of always the preferred leader, each partition's leader
/// were chosen within its replica set to even out leadership: a greedy pass in partition order
/// that picks the replica leading the fewest partitions so far (ties: replica order). Not part
/// of the placement module; a what-if for the capacity model.
fn balanced_leaders(placement: &Placement) -> Vec<f64> {
    let mut led: std::collections::BTreeMap<NodeId, usize> =
        placement.members().iter().map(|m| (m.id, 0)).collect();
    for (_, set) in placement.iter() {
        let best = set.iter().min_by_key(|n| led[*n]).copied();
        if let Some(best) = best {
            *led.entry(best).or_insert(0) += 1;
        }
    }
    led.values().map(|&c| c as f64).collect()
}

/// The figures of one set of diffs (one per trial).
struct Moves {
    partitions: Vec<f64>,
    copied: Vec<f64>,
    leaders: Vec<f64>,
    fraction: Vec<f64>,
}

impl Moves {
    fn of(diffs: &[PlacementDiff]) -> Self {
        Self {
            partitions: diffs.iter().map(|d| d.partitions_changed() as f64).collect(),
            copied: diffs.iter().map(|d| d.slots_copied() as f64).collect(),
            leaders: diffs.iter().map(|d| d.leader_changes() as f64).collect(),
            fraction: diffs.iter().map(PlacementDiff::fraction_copied).collect(),
        }
    }
}

struct Row {
    n: u64,
    width: usize,
    compute_ms: f64,
    leaders: Stats,
    replicas: Stats,
    /// Leaders per node with the greedy balancing what-if.
    balanced: Stats,
    /// Binomial-theory CV of leaders and of replicas per node (equal weights only).
    theory_cv: Option<(f64, f64)>,
    /// The joining node's share of the total weight after it joins.
    new_share: f64,
    join: Moves,
    leave: Moves,
    /// Per weight class: (weight, nodes, mean leaders, mean replicas).
    classes: Vec<(u32, usize, f64, f64)>,
}

fn simulate(args: &Args, n: u64) -> Result<Row, Box<dyn std::error::Error>> {
    let weight_of = |id: NodeId| {
        let i = usize::try_from((id - 1) % args.weights.len() as u64).unwrap_or(0);
        args.weights[i]
    };
    let members: Vec<Member> = (1..=n).map(|id| Member::weighted(id, weight_of(id))).collect();
    let started = Instant::now();
    let base = Placement::new(&members, args.replication)?;
    let compute_ms = started.elapsed().as_secs_f64() * 1e3;
    let loads = base.loads();
    let leaders = stats(&loads.iter().map(|l| l.leaders as f64).collect::<Vec<_>>());
    let replicas = stats(&loads.iter().map(|l| l.replicas as f64).collect::<Vec<_>>());
    let balanced = stats(&balanced_leaders(&base));
    let width = base.effective_replication();
    let total = PARTITION_COUNT as f64;
    let binomial_cv = |p: f64| if p >= 1.0 { 0.0 } else { ((1.0 - p) / (total * p)).sqrt() };
    let uniform = members.iter().all(|m| m.weight == members[0].weight);
    let theory_cv =
        uniform.then(|| (binomial_cv(1.0 / n as f64), binomial_cv(width as f64 / n as f64)));
    let total_weight: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    let new_weight = f64::from(args.weights[0]);
    let new_share = new_weight / (total_weight as f64 + new_weight);

    let mut joins = Vec::new();
    for trial in 0..args.join_trials {
        let mut grown = members.clone();
        grown.push(Member::weighted(1_000_000 + trial, args.weights[0]));
        joins.push(base.diff(&Placement::new(&grown, args.replication)?));
    }
    let mut leaves = Vec::new();
    if n > 1 {
        for gone in 1..=n {
            let shrunk: Vec<Member> = members.iter().copied().filter(|m| m.id != gone).collect();
            leaves.push(base.diff(&Placement::new(&shrunk, args.replication)?));
        }
    }

    let mut classes: Vec<(u32, usize, f64, f64)> = Vec::new();
    let mut weights: Vec<u32> = args.weights.clone();
    weights.sort_unstable();
    weights.dedup();
    for w in weights {
        let of: Vec<_> = loads.iter().filter(|l| l.weight == w).collect();
        if of.is_empty() {
            continue;
        }
        let k = of.len() as f64;
        let mean_leaders = of.iter().map(|l| l.leaders as f64).sum::<f64>() / k;
        let mean_replicas = of.iter().map(|l| l.replicas as f64).sum::<f64>() / k;
        classes.push((w, of.len(), mean_leaders, mean_replicas));
    }

    Ok(Row {
        n,
        width,
        compute_ms,
        leaders,
        replicas,
        balanced,
        theory_cv,
        new_share,
        join: Moves::of(&joins),
        leave: Moves::of(&leaves),
        classes,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.weights.is_empty() || args.weights.contains(&0) {
        return Err("--weights must be a non-empty list of positive integers".into());
    }
    if args.nodes.contains(&0) {
        return Err("--nodes must be positive".into());
    }
    let mut rows = Vec::new();
    for &n in &args.nodes {
        rows.push(simulate(&args, n)?);
    }
    let r = args.replication;
    let weights: Vec<String> = args.weights.iter().map(u32::to_string).collect();
    println!(
        "Placement of {PARTITION_COUNT} partitions, R = {r}, node weights cycled over [{}]; \
         joins over {} new ids, leaves over every node.\n",
        weights.join(", "),
        args.join_trials
    );

    println!("### Load per node\n");
    println!(
        "| nodes | R used | partitions led per node: min / mean / max | CV (binomial) | \
         replica slots per node: min / mean / max | CV (binomial) | \
         led per node if balanced within each set: min / max | placement time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let (l, s) = (&row.leaders, &row.replicas);
        let theory = |pick: fn((f64, f64)) -> f64| {
            row.theory_cv.map_or_else(|| "–".to_owned(), |t| format!("{:.2}", pick(t)))
        };
        println!(
            concat!(
                "| {} | {} | {:.0} / {:.1} / {:.0} | {:.2} ({}) | {:.0} / {:.1} / {:.0} ",
                "| {:.2} ({}) | {:.0} / {:.0} | {:.2} ms |"
            ),
            row.n,
            row.width,
            l.min,
            l.mean,
            l.max,
            l.cv,
            theory(|t| t.0),
            s.min,
            s.mean,
            s.max,
            s.cv,
            theory(|t| t.1),
            row.balanced.min,
            row.balanced.max,
            row.compute_ms
        );
    }

    println!("\n### One node joins (N → N + 1)\n");
    println!(
        "| nodes | partitions whose replica set changes | ideal | replica slots copied | \
         leader changes | ideal | data copied | ideal |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        // With equal weights these are exact expectations: R/(N+1) of the partitions gain the
        // new node, 1/(N+1) of them make it leader, and 1/(N+1) of the data is copied. With
        // unequal weights the leader figure uses the new node's weight share (exact) and the
        // others R times that share (an approximation: no node holds two replicas of a
        // partition).
        let total = PARTITION_COUNT as f64;
        let width_after = r.min(usize::try_from(row.n).unwrap_or(usize::MAX).saturating_add(1));
        let ideal_sets = total * (r as f64 * row.new_share).min(1.0);
        let ideal_leaders = total * row.new_share;
        let ideal_fraction = ideal_sets / (total * width_after as f64);
        println!(
            "| {} → {} | {} | {:.1} | {} | {} | {:.1} | {} | {:.1} % |",
            row.n,
            row.n + 1,
            range(&row.join.partitions, 1),
            ideal_sets,
            range(&row.join.copied, 1),
            range(&row.join.leaders, 1),
            ideal_leaders,
            pct(&row.join.fraction),
            100.0 * ideal_fraction
        );
    }

    if args.weights.len() > 1 {
        println!(
            "\nWith unequal weights, the ideal leader changes are the new node's share of the \
             weight; the other ideals are R times that share (approximate)."
        );
    }

    println!("\n### One node leaves (N → N − 1)\n");
    println!(
        "| nodes | partitions whose replica set changes | replica slots copied | \
         leader changes (all forced: the leader left) | data copied |"
    );
    println!("|---|---|---|---|---|");
    for row in rows.iter().filter(|row| row.n > 1) {
        println!(
            "| {} → {} | {} | {} | {} | {} |",
            row.n,
            row.n - 1,
            range(&row.leave.partitions, 1),
            range(&row.leave.copied, 1),
            range(&row.leave.leaders, 1),
            pct(&row.leave.fraction)
        );
    }

    if args.weights.len() > 1 {
        println!("\n### Per weight class\n");
        println!(
            "| nodes | weight | nodes of that weight | partitions led, mean | replica slots, mean |"
        );
        println!("|---|---|---|---|---|");
        for row in &rows {
            for (w, k, leaders, replicas) in &row.classes {
                println!("| {} | {w} | {k} | {leaders:.1} | {replicas:.1} |", row.n);
            }
        }
    }
    Ok(())
}
