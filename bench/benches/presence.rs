//! Presence on the home shard (`shard::home::Home::handle` and `tick`), for 1,000 users with
//! two direct-conversation peers each: going online (first session up: record, peer lookup,
//! presence notices), going offline (last session down, then the grace period runs out:
//! record, notices, last-seen write), and one batched lease renewal covering every user.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_bench::PresenceFixture;

fn presence(c: &mut Criterion) {
    let users = 1000usize;
    let p = PresenceFixture::new(users);
    assert_eq!(p.handle(p.session_up_msgs()), users, "one peer notice per user (one home shard)");
    assert_eq!(p.session_count(&p.users()[0]), 1);
    p.handle(p.session_down_msgs());
    assert_eq!(p.expire_grace(), users, "one last-seen write per user");

    let mut g = c.benchmark_group("presence");
    g.throughput(Throughput::Elements(users as u64));
    g.bench_function(BenchmarkId::new("online", users), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let up = p.session_up_msgs();
                let t = Instant::now();
                black_box(p.handle(up));
                timed += t.elapsed();
                p.handle(p.session_down_msgs());
                p.expire_grace();
            }
            timed
        });
    });
    g.bench_function(BenchmarkId::new("offline", users), |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                p.handle(p.session_up_msgs());
                let down = p.session_down_msgs();
                let t = Instant::now();
                p.handle(down);
                black_box(p.expire_grace());
                timed += t.elapsed();
            }
            timed
        });
    });
    p.handle(p.session_up_msgs());
    g.bench_function(BenchmarkId::new("renew", users), |b| {
        b.iter_batched(|| vec![p.renew_msg()], |m| p.handle(m), BatchSize::SmallInput);
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchboard_bench::quick();
    targets = presence
}
criterion_main!(benches);
