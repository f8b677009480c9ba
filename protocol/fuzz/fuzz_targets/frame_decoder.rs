//! Arbitrary bytes, split into chunks, through the codec the broker's TCP reader uses
//! (`ServerCodec`, which decodes `ClientFrame`s), with its frame size limit.
//!
//! Input: byte 0 picks the limit (see `seeds::limit`), byte 1 the chunking (0: whole, else
//! the seed of pseudo-random chunk sizes), the rest is the byte stream. Like the broker, the
//! reader appends each chunk, decodes every frame buffered, and stops at the first error.
//!
//! Checked: nothing panics; a frame consumes exactly its header and declared length, which is
//! within the limit; `Ok(None)` only when the buffer holds less than one whole frame; a
//! `TooLarge` error names the declared length, which is over the limit; the frames and the
//! error do not depend on how the stream was split; no single allocation while decoding is
//! larger than a small multiple of the bytes received so far (an announced length is never
//! reserved up front); and every decoded frame survives a binary round trip.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::codec::HEADER_LEN;
use switchboard_protocol::{ClientFrame, FrameError, ServerCodec};
use switchboard_protocol_fuzz::check_binary_round_trip;
use tokio_util::codec::Decoder as _;

/// Records the largest single allocation made while armed.
struct Tracking;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Slack for fixed-size allocations (a Vec's first growth to 4 elements, a BytesMut's first
/// buffer, an error's message).
const ALLOC_SLACK: usize = 4096;
/// Decoded messages may take more memory than their encoding (a 2-byte empty string becomes a
/// 24-byte `String` in a Vec that doubles), but only by a constant factor.
const ALLOC_FACTOR: usize = 64;

fn limit(selector: u8) -> usize {
    match selector & 3 {
        0 => switchboard_protocol::DEFAULT_MAX_FRAME_BYTES,
        1 => 64 << 10,
        2 => usize::from(selector >> 2),
        _ => 16 << 20,
    }
}

/// What one decode step produced.
#[derive(Debug, PartialEq)]
enum Outcome {
    Frame(ClientFrame),
    TooLarge { len: usize, max: usize },
    Malformed,
}

/// xorshift32, seeded so that it never sticks at 0.
fn chunk_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut x = u32::from(seed) | 0x100;
    std::iter::from_fn(move || {
        if seed == 1 {
            return Some(1);
        }
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Mostly small chunks, sometimes larger ones.
        Some(if x % 8 == 0 { 1 + (x >> 3) as usize % 512 } else { 1 + (x >> 3) as usize % 16 })
    })
}

/// The declared body length at the front of `buf`, if a whole header is there.
fn declared(buf: &[u8]) -> Option<usize> {
    let h: [u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(h) as usize)
}

/// Feeds `stream` in chunks, decoding after each as the broker's reader does.
fn run(max: usize, stream: &[u8], chunking: u8) -> Vec<Outcome> {
    let mut codec = ServerCodec::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut sizes = chunk_sizes(chunking);
    let mut fed = 0;
    while !rest.is_empty() {
        let n = if chunking == 0 { rest.len() } else { sizes.next().unwrap_or(1).min(rest.len()) };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        fed += n;
        LARGEST.store(0, Ordering::Relaxed);
        ARMED.store(true, Ordering::Relaxed);
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let header = declared(&buf);
            let step = codec.decode(&mut buf);
            ARMED.store(false, Ordering::Relaxed);
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(
                largest <= ALLOC_SLACK + ALLOC_FACTOR * fed,
                "allocated {largest} bytes after receiving {fed} (limit {max}, header {header:?})"
            );
            match step {
                Ok(Some(frame)) => {
                    let len = header.expect("a frame had a header");
                    assert!(len <= max, "frame of {len} bytes over the limit {max}");
                    assert_eq!(before - buf.len(), HEADER_LEN + len, "frame consumed");
                    check_binary_round_trip(&frame);
                    out.push(Outcome::Frame(frame));
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                    if let Some(len) = header {
                        assert!(len <= max, "declared {len} over the limit {max} was not refused");
                        assert!(buf.len() < HEADER_LEN + len, "a whole frame was left buffered");
                    }
                    break;
                }
                Err(FrameError::TooLarge { len, max: m }) => {
                    assert_eq!((Some(len), m), (header, max), "TooLarge names the header");
                    assert!(len > max, "refused {len} bytes within the limit {max}");
                    out.push(Outcome::TooLarge { len, max });
                    return out;
                }
                Err(FrameError::Malformed(_)) => {
                    let len = header.expect("a malformed frame had a header");
                    assert!(len <= max);
                    out.push(Outcome::Malformed);
                    return out;
                }
                Err(e) => panic!("unexpected error from an in-memory buffer: {e}"),
            }
            LARGEST.store(0, Ordering::Relaxed);
            ARMED.store(true, Ordering::Relaxed);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [selector, chunking, stream @ ..] = data else { return };
    let max = limit(*selector);
    let chunked = run(max, stream, *chunking);
    if *chunking != 0 {
        let whole = run(max, stream, 0);
        assert_eq!(chunked, whole, "the outcome depends on how the stream was split");
    }
});
