//! Whole frames from an async byte stream, and framed writes.

use bytes::{Bytes, BytesMut};
use payswitch_protocol::{FrameDecoder, FrameError, Message};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why no further frame can be read from a stream.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The peer broke the framing: the stream cannot be resynchronised.
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// A frame begun was not finished within the reader's stall timeout.
    #[error("a frame begun was not finished within {0:?}")]
    Stalled(std::time::Duration),
    /// The transport failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Receive buffer to start with: a few typical messages. It grows only for a frame whose
/// header has passed the size check, so it never exceeds one maximum frame plus a read.
const INITIAL_BUFFER: usize = 4 * 1024;

/// Reads frames from `R`, one whole frame at a time.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// How long a frame may take from its first byte to its last; `None`: no bound.
    stall_timeout: Option<std::time::Duration>,
    /// When the partial frame in `buf` (if any) began to arrive.
    partial_since: Option<tokio::time::Instant>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `inner`, refusing frames over `max_frame` bytes.
    pub fn new(inner: R, max_frame: usize) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(INITIAL_BUFFER),
            decoder: FrameDecoder::new(max_frame),
            stall_timeout: None,
            partial_since: None,
        }
    }

    /// Bounds the time from a frame's first byte to its last: a peer that begins a frame
    /// and stalls gets [`ReadError::Stalled`] instead of holding the stream (and the
    /// buffer) forever. Waiting for a frame to begin is not bounded here.
    pub fn with_stall_timeout(mut self, stall_timeout: std::time::Duration) -> FrameReader<R> {
        self.stall_timeout = Some(stall_timeout);
        self
    }

    /// The next frame (without header), or `Ok(None)` at a clean end of stream.
    ///
    /// Cancel safe: partial data stays in the reader's buffer, so this can sit in a
    /// `select!` branch.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                // What is left, if anything, is the next frame begun now.
                self.partial_since = (!self.buf.is_empty()).then(tokio::time::Instant::now);
                return Ok(Some(frame));
            }
            let read = match (self.stall_timeout, self.partial_since) {
                (Some(stall), Some(since)) => {
                    // A deadline, not a duration: this future is made again each time the
                    // caller polls it anew, and must not extend the frame's time.
                    tokio::time::timeout_at(since + stall, self.inner.read_buf(&mut self.buf))
                        .await
                        .map_err(|_| ReadError::Stalled(stall))??
                }
                _ => self.inner.read_buf(&mut self.buf).await?,
            };
            if read == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated(self.buf.len()))
                };
            }
            if self.partial_since.is_none() {
                self.partial_since = Some(tokio::time::Instant::now());
            }
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes `message` with its frame header, using `scratch` as the encode buffer.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    scratch: &mut BytesMut,
) -> std::io::Result<()> {
    scratch.clear();
    message
        .encode_framed(scratch)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    writer.write_all(scratch).await
}

/// Writes an already encoded message body with its frame header.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
    scratch: &mut BytesMut,
) -> std::io::Result<()> {
    scratch.clear();
    payswitch_protocol::encode_frame(body, scratch)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    writer.write_all(scratch).await
}
