//! Property tests: every field kind round-trips, and no input makes the decoder panic.

use bytes::{Bytes, BytesMut};
use payswitch_protocol::spec::{self, Encoding, LengthPrefix};
use payswitch_protocol::{FrameDecoder, Message, Mti};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

/// A valid value for field `number`: exact length for fixed fields, 0..=max for variable
/// ones; ASCII for ASCII fields, any byte for binary ones.
fn value_for(number: u8) -> BoxedStrategy<Vec<u8>> {
    let spec = spec::field(number).unwrap();
    let max = usize::from(spec.max_len);
    let len = match spec.prefix {
        LengthPrefix::Fixed => max..=max,
        LengthPrefix::LlVar | LengthPrefix::LllVar => 0..=max,
    };
    match spec.encoding {
        Encoding::Ascii => vec(0u8..0x80, len).boxed(),
        Encoding::Binary => vec(any::<u8>(), len).boxed(),
    }
}

fn message() -> impl Strategy<Value = (String, Vec<(u8, Vec<u8>)>)> {
    let mti = "[0-9]{4}";
    let fields = btree_map(2u8..=128, Just(()), 0..24).prop_flat_map(|numbers| {
        numbers
            .into_keys()
            .map(|n| value_for(n).prop_map(move |v| (n, v)))
            .collect::<Vec<_>>()
    });
    (mti, fields)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn built_messages_round_trip((mti, fields) in message()) {
        let mut builder = Message::builder(Mti::parse(mti.as_bytes()).unwrap());
        for (n, v) in &fields {
            builder.set(*n, v).unwrap();
        }
        let built = builder.build();
        let wire = built.to_bytes();
        prop_assert_eq!(wire.len(), built.encoded_len());
        let decoded = Message::decode(wire.clone()).unwrap();
        prop_assert_eq!(decoded.mti().to_string(), mti.clone());
        let numbers: Vec<u8> = fields.iter().map(|(n, _)| *n).collect();
        prop_assert_eq!(decoded.field_numbers().collect::<Vec<_>>(), numbers);
        for (n, v) in &fields {
            prop_assert_eq!(decoded.get(*n), Some(&v[..]));
        }
        prop_assert_eq!(decoded.to_bytes(), wire.clone());

        let mut framed = BytesMut::new();
        decoded.encode_framed(&mut framed).unwrap();
        let frame = FrameDecoder::new(u16::MAX as usize).decode(&mut framed).unwrap().unwrap();
        prop_assert_eq!(frame, wire);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(raw in vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(Bytes::from(raw));
    }

    #[test]
    fn decoding_mutated_messages_never_panics(
        (mti, fields) in message(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut builder = Message::builder(Mti::parse(mti.as_bytes()).unwrap());
        for (n, v) in &fields {
            builder.set(*n, v).unwrap();
        }
        let mut wire = builder.build().to_bytes().to_vec();
        for (index, byte) in flips {
            let i = index.index(wire.len());
            wire[i] = byte;
        }
        if let Ok(msg) = Message::decode(Bytes::from(wire)) {
            // Whatever decodes must re-encode and decode to the same fields.
            let again = Message::decode(msg.to_bytes()).unwrap();
            for n in msg.field_numbers() {
                prop_assert_eq!(again.get(n), msg.get(n));
            }
        }
    }

    #[test]
    fn framing_never_panics_and_never_returns_oversized_frames(
        raw in vec(any::<u8>(), 0..2048), max in 1usize..1024,
    ) {
        let decoder = FrameDecoder::new(max);
        let mut buf = BytesMut::from(&raw[..]);
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            prop_assert!(frame.len() <= max && !frame.is_empty());
        }
    }
}
