//! Cluster membership over real gossip: three broker processes on 127.0.0.1–3, joined through
//! one seed, watched through each node's `/cluster` view and `/readyz`.

use switchboard_tests::{Broker, Cluster, Options, http_get, member};

fn fast_gossip() -> Options {
    // Fast rounds so failure detection takes a second or two, not tens of seconds.
    Options::with_args(&["--set", "cluster.gossip_interval_ms=100"])
}

fn all_live(view: &serde_json::Value, n: u64) -> bool {
    (1..=n).all(|id| member(view, id).is_some_and(|m| m["live"] == true))
}

#[tokio::test]
async fn given_three_nodes_joined_through_one_seed_should_all_see_each_other_with_dialable_addresses()
 {
    let cluster = Cluster::start(3, &fast_gossip());
    for (i, node) in cluster.nodes.iter().enumerate() {
        let view = cluster.wait_view(i, "all three nodes live", |v| all_live(v, 3)).await;
        assert_eq!(view["self_id"], i as u64 + 1);
        for (j, other) in cluster.nodes.iter().enumerate() {
            let m = member(&view, j as u64 + 1).expect("member");
            assert_eq!(m["tcp"], other.addr.to_string(), "node {} as seen by {}", j + 1, i + 1);
            assert_eq!(m["http"], other.http.to_string());
            assert_eq!(m["generation"], 1);
            assert_eq!(m["shards"], 3);
        }
        assert_eq!(http_get(node.http, "/readyz").await.0, 200);
    }
    let (_, metrics) = http_get(cluster.nodes[1].http, "/metrics").await;
    assert!(
        metrics.contains("switchboard_cluster_nodes{state=\"live\"} 3"),
        "live-node gauge missing:\n{metrics}"
    );
}

#[tokio::test]
async fn given_a_killed_node_should_be_suspected_down_and_its_restart_seen_as_a_new_generation() {
    let mut cluster = Cluster::start(3, &fast_gossip());
    cluster.wait_view(0, "all three nodes live", |v| all_live(v, 3)).await;

    cluster.nodes[2].kill();
    let view = cluster
        .wait_view(0, "node 3 down", |v| member(v, 3).is_some_and(|m| m["live"] == false))
        .await;
    assert_eq!(member(&view, 3).expect("node 3")["leaving"], false, "a kill is not a leave");
    cluster.wait_view(1, "node 3 down", |v| member(v, 3).is_some_and(|m| m["live"] == false)).await;

    cluster.nodes[2].restart();
    for node in 0..3 {
        let view = cluster
            .wait_view(node, "node 3 back with generation 2", |v| {
                member(v, 3).is_some_and(|m| m["live"] == true && m["generation"] == 2)
            })
            .await;
        // The previous incarnation is gone at once: one entry per node id.
        assert_eq!(view["members"].as_array().map(Vec::len), Some(3));
    }
}

#[tokio::test]
async fn given_a_node_stopped_gracefully_should_be_seen_leaving_before_failure_detection() {
    // A failure detector this lax would take minutes to suspect a silent node: seeing the node
    // go within the wait proves the announcement, not the detector, did it.
    let opts = Options::with_args(&[
        "--set",
        "cluster.gossip_interval_ms=100",
        "--set",
        "cluster.phi_threshold=10000",
    ]);
    let mut cluster = Cluster::start(3, &opts);
    cluster.wait_view(0, "all three nodes live", |v| all_live(v, 3)).await;
    assert!(cluster.nodes[1].terminate().success());
    let view = cluster
        .wait_view(0, "node 2 leaving", |v| member(v, 2).is_some_and(|m| m["live"] == false))
        .await;
    assert_eq!(member(&view, 2).expect("node 2")["leaving"], true);
}

#[tokio::test]
async fn given_seeds_that_answer_nobody_should_not_be_ready_until_a_peer_is_heard() {
    // A seed address where nothing listens: the node runs but has not joined a cluster.
    let unused = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp").local_addr().expect("addr");
    let mut opts = fast_gossip();
    opts.gossip = true;
    opts.args.push(format!("--seeds={unused}"));
    let lonely = Broker::start_with(opts);
    let (status, body) = http_get(lonely.http, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not joined: no peer reachable through the seeds\n"));
    let (status, view) = http_get(lonely.http, "/cluster").await;
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&view).expect("json");
    assert_eq!(view["members"].as_array().map(Vec::len), Some(1));

    // Without clustering there is no view, and readiness does not depend on peers.
    let single = Broker::start();
    assert_eq!(http_get(single.http, "/cluster").await.0, 404);
    assert_eq!(http_get(single.http, "/readyz").await.0, 200);
}
