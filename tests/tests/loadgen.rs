//! Smoke tests of every `switchboard-loadgen` scenario against a real broker: seconds of tiny
//! load, asserting the report's counts and correctness checks (never its rates or latencies).

use clap::Parser as _;
use switchboard_loadgen::Report;
use switchboard_loadgen::cli::Cli;
use switchboard_tests::{Broker, SECRET};

/// Runs the load generator with `args` (after the program name) against `target`.
async fn loadgen(target: String, args: &[&str]) -> Report {
    let mut argv = vec!["switchboard-loadgen"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--target", &target, "--secret", SECRET, "--no-progress"]);
    let cli = Cli::try_parse_from(&argv).expect("valid arguments");
    let common = cli.scenario.common().clone();
    let report = switchboard_loadgen::run(cli).await.expect("the run completes");
    // As the binary does after printing the table.
    report.write_files(&common).expect("the report's files are written");
    report
}

fn extra(r: &Report, key: &str) -> f64 {
    *r.extra.get(key).unwrap_or_else(|| panic!("report has no {key}: {:?}", r.extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_broker_when_direct_runs_closed_loop_over_tcp_should_report_acks_and_deliveries() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("direct.json");
    let svg = dir.path().join("direct.svg");
    let r = loadgen(
        format!("switchboard://{}", broker.addr),
        &[
            "direct",
            "--pairs",
            "3",
            "--in-flight",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--json",
            json.to_str().expect("utf-8 path"),
            "--plot",
            svg.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(r.counts.sent > 0 && r.counts.acked > 0 && r.counts.delivered > 0, "{:?}", r.counts);
    assert!(r.ack_latency_us.count > 0 && r.delivery_latency_us.count > 0);
    // The files the report was written to hold the same run.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    assert_eq!(written["scenario"], "direct");
    assert_eq!(written["counts"]["acked"], r.counts.acked);
    let chart = std::fs::read_to_string(&svg).expect("svg written");
    assert!(chart.contains("<svg"), "not an SVG: {}", &chart[..chart.len().min(100)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_room_when_one_publisher_sends_open_loop_over_websocket_should_fan_out() {
    let broker = Broker::start();
    let r = loadgen(
        format!("ws://{}", broker.http),
        &[
            "room",
            "--members",
            "5",
            "--publishers",
            "1",
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
        ],
    )
    .await;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(r.counts.acked > 0, "{:?}", r.counts);
    // Four other members receive every message.
    assert!(r.counts.delivered > 2 * r.counts.acked, "{:?}", r.counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_idle_connections_when_connect_runs_should_hold_them_and_measure_the_broker() {
    let broker = Broker::start();
    let r = loadgen(
        format!("switchboard://{}", broker.addr),
        &["connect", "--connections", "40", "--duration", "1s", "--warmup", "0s"],
    )
    .await;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!((extra(&r, "connections") - 40.0).abs() < f64::EPSILON);
    assert!(r.extra.contains_key("broker_bytes_per_connection"), "{:?}", r.extra);
    assert!(r.broker.is_some(), "the local broker's /proc entry was read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_churn_when_connections_drop_and_resume_should_lose_and_reorder_nothing() {
    let broker = Broker::start();
    let r = loadgen(
        format!("switchboard://{}", broker.addr),
        &[
            "churn",
            "--users",
            "20",
            "--churn-rate",
            "10",
            "--offline",
            "200ms",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--warmup",
            "0s",
        ],
    )
    .await;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(r.counts.acked > 0 && r.counts.delivered > 0, "{:?}", r.counts);
    assert!(extra(&r, "connections_dropped") > 0.0);
    assert!(extra(&r, "reconnects") > 0.0);
    assert_eq!(extra(&r, "missing"), 0.0);
    assert_eq!(extra(&r, "order_violations"), 0.0);
    assert!(r.other_latency_us.get("reconnect").is_some_and(|p| p.count > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_chat_mix_when_it_runs_should_deliver_everything_with_typing_and_receipts() {
    let broker = Broker::start();
    let r = loadgen(
        format!("ws://{}", broker.http),
        &[
            "chat",
            "--users",
            "30",
            "--groups",
            "4",
            "--max-group",
            "10",
            "--typing",
            "1",
            "--read-every",
            "300ms",
            "--rate",
            "60",
            "--duration",
            "2s",
            "--warmup",
            "0s",
        ],
    )
    .await;
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(r.counts.acked > 0 && r.counts.delivered > 0, "{:?}", r.counts);
    assert_eq!(extra(&r, "missing"), 0.0);
    assert_eq!(extra(&r, "order_violations"), 0.0);
    assert!(extra(&r, "groups") > 0.0);
    assert!(extra(&r, "typing_events_per_sec") > 0.0);
    assert!(extra(&r, "receipt_events_per_sec") > 0.0);
    assert!(extra(&r, "mark_read_per_sec") > 0.0);
}
