//! Durable group commit: the broker's writer in `sync` mode (one fsync per round; here one
//! batch in flight, so one fsync per batch) against fjall alone writing the same records in
//! one batch plus one `persist(SyncData)`. Same group, ids `broker/N` and `fjall/N`, so the
//! broker's durable throughput reads as a fraction of the store's.
//!
//! This disk's fsync is slow (milliseconds) and bimodal: few samples, short runs, and compare
//! only the two numbers of one run.

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_bench::{FjallBaseline, WriterFixture, message_ops, message_records};
use switchboard_broker::config::Durability;

fn durable_commit(c: &mut Criterion) {
    // fjall first: opening the broker's store lowers the priority of every fjall worker
    // thread then running, the baseline's included, so both sides run alike.
    let fjall = FjallBaseline::open();
    let mut broker = WriterFixture::open(Durability::Sync);
    let (mut broker_seq, mut fjall_seq) = (0u64, 0u64);
    let mut g = c.benchmark_group("durable_commit");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for batch in [1usize, 16, 128] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("broker", batch), |b| {
            b.iter_batched(
                || message_ops(message_records(&mut broker_seq, batch)),
                |ops| broker.commit(ops),
                BatchSize::SmallInput,
            );
        });
        g.bench_function(BenchmarkId::new("fjall", batch), |b| {
            b.iter_batched(
                || message_records(&mut fjall_seq, batch),
                |records| fjall.commit_sync(records),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, durable_commit);
criterion_main!(benches);
