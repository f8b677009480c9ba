//! The TCP transport: length-prefixed frames in both directions.
//!
//! Reading: an idle connection holds no read buffer. The reader waits for readability, then
//! reads into a buffer that exists only while bytes are buffered, decodes every complete frame
//! and drops the buffer once it is empty, so idle memory is the socket and a few small structs.
//!
//! Writing: the writer drains the outbound queue (up to 64 frames) into one vectored write.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use switchboard_protocol::{ServerCodec, SharedFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::Decoder;
use tracing::Instrument;

use super::session::Session;
use crate::metrics::Transport;
use crate::shard::Shard;
use crate::shard::outbound::Outbound;

/// Frames taken from the queue per write.
const FRAMES_PER_WRITE: usize = 64;
/// A write that makes no progress for this long closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to flush its last frames.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Read chunk size.
const READ_CHUNK: usize = 8 * 1024;

/// Serves one accepted TCP connection until it closes.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr) {
    // The connection caps come first: a refused connection costs no session state.
    let _slot = match shard.limiters.slots.acquire(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            refuse_over_cap(stream, refusal).await;
            return;
        }
    };
    let session = Session::new(shard, peer, Transport::Tcp);
    let span = session.span().clone();
    async move {
        tracing::debug!("connected");
        let (rd, wr) = stream.into_split();
        let writer =
            tokio::task::spawn_local(write_loop(wr, session.out.clone(), session.shard.clone()));
        match session.shard.limiters.connect.check(&peer.ip()) {
            Ok(()) => read_loop(&session, rd).await,
            Err(wait) => session.refuse(wait),
        }
        session.finish();
        // Whatever ended the reading (the peer closed, an error, a Disconnect already queued),
        // the writer flushes what is queued and then closes the socket.
        session.out.close();
        let mut writer = writer;
        if tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await.is_err() {
            tracing::debug!("writer did not finish in time; dropping the connection");
            writer.abort();
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await;
}

/// Tells a connection over a connection cap why it is refused (`LIMIT_EXCEEDED`, then
/// `Disconnect{connection_limit}` with a retry hint) and closes it.
async fn refuse_over_cap(stream: TcpStream, refusal: crate::ratelimit::SlotRefusal) {
    use switchboard_protocol::{DisconnectReason, ErrorCode, ServerFrame, encode_frame};
    let message = refusal.refused();
    let mut bytes =
        encode_frame(&ServerFrame::error(0, ErrorCode::LimitExceeded, &message)).to_vec();
    bytes.extend_from_slice(&encode_frame(&ServerFrame::disconnect(
        DisconnectReason::ConnectionLimit,
        &message,
        crate::shard::UNAVAILABLE_RETRY_MS,
    )));
    super::write_and_close(stream, &bytes).await;
}

async fn read_loop(session: &Session, rd: OwnedReadHalf) {
    let mut codec = ServerCodec::new(session.shard.config.limits.max_frame_bytes);
    let mut buf = BytesMut::new();
    // Deadlines count whole frames, not bytes: a peer trickling bytes cannot hold a
    // connection open (before Hello, the deadline is absolute). `now` is read when the socket
    // turns readable, so it is no earlier than the arrival of every frame then buffered: their
    // token checks use it, and the next deadline is set from it (read again only after a wait
    // for an in-flight slot or after the handshake).
    let mut now = tokio::time::Instant::now();
    let mut deadline = session.read_deadline(now);
    loop {
        // Everything buffered first.
        loop {
            let buffered = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let len = buffered - buf.len();
                    let Some(at) = session.take_frame(frame, len, now).await else { return };
                    now = at;
                    deadline = session.read_deadline(now);
                }
                Ok(None) => break,
                Err(e) => {
                    session.on_frame_error(&e);
                    return;
                }
            }
        }
        if buf.is_empty() {
            buf = BytesMut::new();
        }
        tokio::select! {
            () = session.cancel.cancelled() => {
                session.on_cancel();
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                session.on_read_timeout();
                return;
            }
            readable = rd.readable() => {
                if readable.is_err() {
                    return;
                }
                now = tokio::time::Instant::now();
            }
        }
        buf.reserve(READ_CHUNK);
        match rd.try_read_buf(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

async fn write_loop(mut wr: OwnedWriteHalf, out: Rc<Outbound>, shard: Rc<Shard>) {
    loop {
        out.ready().await;
        // A fresh vector per write: an idle connection keeps no buffer.
        let mut batch: Vec<SharedFrame> = Vec::new();
        out.drain(FRAMES_PER_WRITE, &mut batch);
        if batch.is_empty() {
            break; // closing and fully flushed
        }
        match tokio::time::timeout(WRITE_TIMEOUT, write_all(&mut wr, &batch)).await {
            Ok(Ok(())) => {
                for frame in &batch {
                    shard.stats.frame_out(Transport::Tcp, frame.kind(), frame.len());
                }
            }
            written @ (Ok(Err(_)) | Err(_)) => {
                // A write that made no progress in time is a slow consumer; a broken socket
                // is just gone.
                if written.is_err() {
                    metrics::counter!(crate::metrics::SLOW_CONSUMERS, "reason" => "write_timeout")
                        .increment(1);
                }
                // The peer stopped reading (or the socket broke): nothing more can reach it,
                // so the Disconnect queued here is for the record; closing the queue stops the
                // reader too.
                out.close_with(switchboard_protocol::ServerFrame::disconnect(
                    switchboard_protocol::DisconnectReason::SlowConsumer,
                    "write timed out",
                    0,
                ));
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Writes every buffer, in order, with as few `writev` calls as the socket allows.
async fn write_all(wr: &mut OwnedWriteHalf, bufs: &[SharedFrame]) -> std::io::Result<()> {
    let mut i = 0;
    let mut offset = 0;
    while let Some(first) = bufs.get(i) {
        let rest = bufs.get(i + 1..).unwrap_or_default();
        let slices: Vec<IoSlice<'_>> =
            std::iter::once(IoSlice::new(first.prefixed().get(offset..).unwrap_or_default()))
                .chain(rest.iter().map(|b| IoSlice::new(b.prefixed())))
                .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(b) = bufs.get(i) else { break };
            let remaining = b.len() - offset;
            if n >= remaining {
                n -= remaining;
                i += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
        // Skip empty buffers so the loop ends.
        while bufs.get(i).is_some_and(|b| b.len() == offset) {
            i += 1;
            offset = 0;
        }
    }
    Ok(())
}

/// Accepts connections on this shard's listener until the shard shuts down.
pub async fn accept_loop(shard: Rc<Shard>, listener: tokio::net::TcpListener) {
    loop {
        tokio::select! {
            () = shard.cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::task::spawn_local(serve(shard.clone(), stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
