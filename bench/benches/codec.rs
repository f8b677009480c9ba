//! Frame codec: decoding pipelined requests, and encoding a delivery once for fan-out.

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use switchboard_bench::{message, pipelined_sends};
use switchboard_protocol::{
    ServerCodec, ServerFrame, encode_frame, encode_message_push, server_frame,
};
use tokio_util::codec::Decoder;

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_pipelined_sends");
    for body in [32usize, 256, 4096] {
        let input = pipelined_sends(64, body);
        g.throughput(Throughput::Elements(64));
        g.bench_with_input(BenchmarkId::from_parameter(body), &input, |b, input| {
            let mut codec = ServerCodec::default();
            b.iter(|| {
                let mut buf = BytesMut::from(&input[..]);
                let mut n = 0;
                while let Ok(Some(f)) = codec.decode(&mut buf) {
                    n += usize::from(f.kind.is_some());
                }
                assert_eq!(n, 64);
            });
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_delivery");
    for body in [32usize, 256, 4096] {
        let msg = message(body, 42);
        g.throughput(Throughput::Elements(1));
        // What the broker does: encode the Message once (for storage), wrap it for delivery.
        g.bench_with_input(BenchmarkId::new("encode_once_and_wrap", body), &msg, |b, msg| {
            b.iter(|| {
                let encoded = msg.encode_to_vec();
                encode_message_push(&encoded)
            });
        });
        // The naive alternative: build and encode the whole push frame.
        g.bench_with_input(BenchmarkId::new("encode_frame", body), &msg, |b, msg| {
            b.iter(|| encode_frame(&ServerFrame::push(server_frame::Kind::Message(msg.clone()))));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = switchboard_bench::quick();
    targets = decode, encode
}
criterion_main!(benches);
