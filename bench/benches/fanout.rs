//! Fan-out on a session shard: the owner's `Deliver` of one committed message reaching a shard
//! that hosts 1,000 receiving sessions (`shard::local::apply`): the one shared frame is pushed
//! to each session's bounded outbound queue.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_bench::{FanOut, RECORD_BODY};

fn fanout(c: &mut Criterion) {
    let sessions = 1000usize;
    let f = FanOut::new(sessions, RECORD_BODY);
    f.deliver();
    assert_eq!(f.drain(), sessions, "every session receives the message");
    assert_eq!(f.deliveries(), sessions as u64);
    let mut g = c.benchmark_group("fanout_local");
    g.throughput(Throughput::Elements(sessions as u64));
    // Queue pushes only; the queues are emptied between iterations, outside the timing.
    g.bench_function(BenchmarkId::new("deliver", sessions), |b| {
        b.iter_batched(|| f.drain(), |_| f.deliver(), BatchSize::PerIteration);
    });
    // Plus the connections' writers taking the frames off the queues (same thread as the
    // shard in the broker).
    g.bench_function(BenchmarkId::new("deliver_and_drain", sessions), |b| {
        b.iter(|| {
            f.deliver();
            f.drain()
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchboard_bench::quick();
    targets = fanout
}
criterion_main!(benches);
