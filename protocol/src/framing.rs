//! The network header: a 2-byte big-endian length before every message.
//!
//! [`FrameDecoder`] takes whole frames out of a receive buffer. It reads the header, checks
//! the announced length against the configured maximum *before* waiting for the body, and
//! splits nothing off until the whole frame has arrived — so a peer cannot make the switch
//! allocate for a frame it will refuse, or parse half a message.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::FrameError;

/// Bytes of the length header.
pub const HEADER_LEN: usize = 2;

/// Default frame limit. The largest 0100/0200 a gateway sends in practice is a few hundred
/// bytes (ICC data included); 8 KiB leaves room for private fields while keeping a
/// per-stream receive buffer small.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024;

/// Splits length-prefixed frames out of a byte stream.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame` bytes (capped at the header's 65 535).
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder {
            max_frame: max_frame.min(usize::from(u16::MAX)),
        }
    }

    /// The configured maximum.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Checks a header without consuming anything: `Ok(Some(len))` when `buf` holds a
    /// complete header announcing an acceptable length.
    pub fn peek_len(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        Ok(Some(len))
    }

    /// Takes the next whole frame (without its header) out of `buf`, or `Ok(None)` if it has
    /// not fully arrived. An error means the stream cannot be resynchronised.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(len) = self.peek_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < HEADER_LEN + len {
            // Reserve for the rest of this frame only: bounded by `max_frame`.
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

/// Appends `message` with its header to `out`. Messages are built by this crate, so a
/// message over 65 535 bytes is a bug, reported as `FrameError::TooLarge`.
pub fn encode_frame(message: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    let len = u16::try_from(message.len()).map_err(|_| FrameError::TooLarge {
        len: message.len(),
        max: usize::from(u16::MAX),
    })?;
    out.reserve(HEADER_LEN + message.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_whole_frame() {
        let d = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&[0u8, 5, b'a', b'b'][..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), 4, "nothing consumed for a partial frame");
        buf.extend_from_slice(b"cde\x00\x01z");
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b"abcde"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b"z"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
    }

    #[test]
    fn refuses_oversized_and_empty_frames_before_the_body_arrives() {
        let d = FrameDecoder::new(100);
        let mut buf = BytesMut::from(&[0x10u8, 0x00][..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: 4096,
                max: 100
            })
        );
        let mut empty = BytesMut::from(&[0u8, 0][..]);
        assert_eq!(d.decode(&mut empty), Err(FrameError::Empty));
    }

    #[test]
    fn encode_then_decode() {
        let mut out = BytesMut::new();
        encode_frame(b"0800", &mut out).unwrap();
        assert_eq!(&out[..], b"\x00\x040800");
        let d = FrameDecoder::default();
        assert_eq!(d.decode(&mut out).unwrap().unwrap(), &b"0800"[..]);
    }
}
