//! `Message::decode` and `Message::decode_prefix` on arbitrary bytes: never a panic, and
//! whatever decodes re-encodes to a message that decodes to the same fields.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use payswitch_protocol::Message;

/// MTI (4 bytes) then the primary bitmap; bit 1 of it announces the secondary bitmap.
const PRIMARY_BITMAP_AT: usize = 4;
const SECONDARY_BITMAP_AT: usize = 12;

/// Re-encodes `message` and checks the result decodes to the same MTI and fields.
fn assert_reencodes(message: &Message) -> Bytes {
    let wire = message.to_bytes();
    assert_eq!(wire.len(), message.encoded_len());
    let again = Message::decode(wire.clone()).expect("an encoded message decodes");
    assert_eq!(again.mti(), message.mti());
    assert!(again.field_numbers().eq(message.field_numbers()));
    for number in message.field_numbers() {
        assert_eq!(again.get(number), message.get(number), "field {number}");
    }
    let mut framed = BytesMut::new();
    message
        .encode_framed(&mut framed)
        .expect("a decoded message fits a frame");
    assert_eq!(&framed[2..], &wire[..]);
    assert_eq!(
        usize::from(u16::from_be_bytes([framed[0], framed[1]])),
        wire.len()
    );
    wire
}

/// Whether `raw` announces a secondary bitmap that is all zero: the one well-formed input
/// whose re-encoding is not byte-identical (the encoder leaves an empty secondary bitmap out).
fn announces_empty_secondary_bitmap(raw: &[u8]) -> bool {
    raw[PRIMARY_BITMAP_AT] & 0x80 != 0
        && raw[SECONDARY_BITMAP_AT..SECONDARY_BITMAP_AT + 8]
            .iter()
            .all(|&b| b == 0)
}

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    let full = Message::decode(raw.clone());
    match Message::decode_prefix(raw.clone()) {
        Ok((partial, error)) => {
            let wire = assert_reencodes(&partial);
            match (error, &full) {
                (None, Ok(message)) => {
                    assert!(message.field_numbers().eq(partial.field_numbers()));
                    if !announces_empty_secondary_bitmap(data) {
                        assert_eq!(wire, raw, "a well-formed message re-encodes byte for byte");
                    }
                }
                (Some(error), Err(full_error)) => assert_eq!(&error, full_error),
                (error, full) => panic!("decode and decode_prefix disagree: {error:?} vs {full:?}"),
            }
        }
        Err(error) => assert_eq!(full.err(), Some(error)),
    }
});
