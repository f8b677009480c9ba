//! The storage writer: committing a batch of message records (group commit without fsync, so
//! the number is the engine's CPU cost plus the hand-off to the writer thread, not this disk's
//! fsync latency). Records are built outside the timed section.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_bench::{WriterFixture, message_ops, message_records};
use switchboard_broker::config::Durability;

fn group_commit(c: &mut Criterion) {
    let mut writer = WriterFixture::open(Durability::Buffered);
    let mut seq = 0u64;
    let mut g = c.benchmark_group("storage_group_commit");
    for batch in [1usize, 16, 128] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_batched(
                || message_ops(message_records(&mut seq, batch)),
                |ops| writer.commit(ops),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchboard_bench::quick();
    targets = group_commit
}
criterion_main!(benches);
