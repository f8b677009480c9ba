//! The storage writer: committing a batch of message records (group commit without fsync, so
//! the number is the engine's CPU cost, not this disk's fsync latency).

use std::sync::Arc;
use std::sync::mpsc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use switchboard_bench::message;
use switchboard_broker::config::{Durability, StorageConfig};
use switchboard_broker::storage::{self, Committed, Ks, Storage, WriteBatch, WriteOp, keys};

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = StorageConfig {
        data_dir: dir.path().to_owned(),
        durability: Durability::Buffered,
        cache_mb: 64,
    };
    let storage = Storage::open(&cfg).expect("open");
    let (writer, join) = storage::writer::spawn(storage.clone()).expect("writer");
    let (tx, rx) = mpsc::channel::<Committed>();
    let tx = std::sync::Mutex::new(tx);
    let sink: storage::CommitSink = Arc::new(move |c| {
        let _ = tx.lock().expect("lock").send(c);
    });
    let mut g = c.benchmark_group("storage_group_commit");
    for batch in [1usize, 16, 128] {
        let mut seq = 0u64;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                let ops = (0..batch)
                    .map(|_| {
                        seq += 1;
                        let value = storage::StoredEntry {
                            epoch: 1,
                            ordinal: seq,
                            message: message(200, seq).encode_to_vec().into(),
                        };
                        WriteOp::Put(
                            Ks::Messages,
                            keys::message_key(7, "g:bench", seq),
                            value.encode_to_vec(),
                        )
                    })
                    .collect();
                writer.submit(WriteBatch { token: seq, ops, sink: sink.clone() }).expect("submit");
                rx.recv().expect("committed").result.expect("ok");
            });
        });
    }
    g.finish();
    writer.shutdown();
    let _ = join.join();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
