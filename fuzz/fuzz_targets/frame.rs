//! `FrameDecoder` on an arbitrary byte stream arriving in arbitrary pieces: never a panic,
//! never a frame over the limit or empty, and the frames it yields are exactly the stream's,
//! in order, with nothing lost or duplicated in the receive buffer.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use payswitch_protocol::{encode_frame, FrameDecoder, Message};

/// Bytes of the frame header.
const HEADER_LEN: usize = 2;

fuzz_target!(|data: &[u8]| {
    // Two bytes of limit and one of piece size, then the stream.
    let [max_hi, max_lo, piece, stream @ ..] = data else {
        return;
    };
    let decoder = FrameDecoder::new(usize::from(u16::from_be_bytes([*max_hi, *max_lo])));
    let piece = usize::from(*piece).max(1);
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    let mut fed = 0;
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= decoder.max_frame());
                    let header = &stream[consumed..consumed + HEADER_LEN];
                    assert_eq!(
                        usize::from(u16::from_be_bytes([header[0], header[1]])),
                        frame.len()
                    );
                    let body = consumed + HEADER_LEN;
                    assert_eq!(&frame[..], &stream[body..body + frame.len()]);
                    consumed = body + frame.len();

                    let mut out = BytesMut::new();
                    encode_frame(&frame, &mut out).expect("a decoded frame fits a header");
                    assert_eq!(&out[..], &stream[body - HEADER_LEN..consumed]);
                    // Frames go on to the message decoder in the switch.
                    let _ = Message::decode_prefix(frame);
                }
                Ok(None) => break,
                // The stream cannot be resynchronised; the switch closes it.
                Err(_) => return,
            }
        }
        assert_eq!(
            &buf[..],
            &stream[consumed..fed],
            "the buffer holds exactly the unread bytes"
        );
    }
});
