//! One ISO 8583 message: zero-copy decoding, building and encoding.
//!
//! A [`Message`] keeps its fields in one [`Bytes`] buffer, each as it is on the wire (length
//! prefix, then value), and the offset of each present field's value. Decoding makes that
//! buffer the received frame itself, so no field data is copied; a [`MessageBuilder`]
//! appends prefix and value to a buffer of its own. Reading a field is an index into
//! `starts` plus, for LLVAR/LLLVAR fields, reading the 2–3 prefix digits before the value;
//! encoding copies each field, prefix included, in one slice.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError, FieldError};
use crate::spec::{self, Encoding, FieldSpec, LengthPrefix, MAX_FIELD};
use crate::types::Mti;

/// Bytes of one bitmap on the wire.
const BITMAP_LEN: usize = 8;
/// Bytes of the MTI on the wire.
const MTI_LEN: usize = 4;

/// A decoded or built ISO 8583 message.
#[derive(Clone)]
pub struct Message {
    mti: Mti,
    /// Bit `n - 1` (counted from the most significant bit of `present[0]`) is set when field
    /// `n` is present, exactly as on the wire. Bit 1 (secondary bitmap) is derived on encode.
    present: [u64; 2],
    /// Offset of each present field's value in `data`, indexed by field number. Frames are
    /// at most 64 KiB (2-byte header), so `u16` covers every message; lengths are not kept,
    /// they are the spec's fixed length or the prefix digits just before the value — which
    /// halves what a decode writes and moves.
    starts: [u16; MAX_FIELD as usize + 1],
    data: Bytes,
}

impl std::fmt::Debug for Message {
    /// Field numbers only: a message may hold a PAN, track data or a PIN block, and Debug
    /// output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("mti", &self.mti)
            .field("fields", &self.field_numbers().collect::<Vec<_>>())
            .finish()
    }
}

fn bit_is_set(present: &[u64; 2], number: u8) -> bool {
    let index = usize::from(number - 1);
    present[index / 64] & (1u64 << (63 - index % 64)) != 0
}

/// The numbers of the data fields (2..=128) set in a bitmap pair, ascending. Steps once per
/// set bit instead of once per possible field: a typical message has a dozen of 127.
#[derive(Debug, Clone)]
struct SetFields {
    words: [u64; 2],
    word: usize,
}

impl SetFields {
    fn new(bits: &[u64; 2]) -> SetFields {
        // Bit 1 is the secondary bitmap, not a data field.
        SetFields {
            words: [bits[0] & !(1u64 << 63), bits[1]],
            word: 0,
        }
    }
}

impl Iterator for SetFields {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        while let Some(&bits) = self.words.get(self.word) {
            if bits != 0 {
                let index = bits.leading_zeros();
                self.words[self.word] = bits & !(1u64 << (63 - index));
                // word < 2 and index < 64: at most 128.
                return Some((self.word * 64) as u8 + index as u8 + 1);
            }
            self.word += 1;
        }
        None
    }
}

/// Clears the bits of field `number` and of every field above it.
fn keep_fields_below(present: &mut [u64; 2], number: u8) {
    let index = usize::from(number - 1);
    let word = index / 64;
    let shift = index % 64;
    // Bits of fields below `number` in its word are the top `shift` bits.
    present[word] &= if shift == 0 { 0 } else { !0u64 << (64 - shift) };
    if word == 0 {
        present[1] = 0;
    }
}

fn set_bit(present: &mut [u64; 2], number: u8) {
    let index = usize::from(number - 1);
    present[index / 64] |= 1u64 << (63 - index % 64);
}

impl Message {
    /// Starts building a message of type `mti`.
    pub fn builder(mti: Mti) -> MessageBuilder {
        MessageBuilder::new(mti)
    }

    /// Decodes one message (without its frame header). Field data is borrowed from `buf`.
    pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
        // Built in place and returned as is: a `Message` is ~0.5 KiB, and moving it through
        // intermediate tuples was a third of the decode time.
        let (mut message, pos) = Message::decode_header(buf)?;
        match message.decode_fields(pos) {
            None => Ok(message),
            Some(error) => Err(error),
        }
    }

    /// Decodes as far as the message is well formed. `Err` when not even the MTI and the
    /// bitmaps can be read; otherwise the message with every field before the first bad
    /// one, and the error that stopped decoding, if any. This lets the switch answer a
    /// malformed request with 39=30 and the fields it could read, instead of silence.
    pub fn decode_prefix(buf: Bytes) -> Result<(Message, Option<DecodeError>), DecodeError> {
        let (mut message, pos) = Message::decode_header(buf)?;
        let error = message.decode_fields(pos);
        Ok((message, error))
    }

    /// Reads the MTI and the bitmaps. The message returned announces every field of the
    /// bitmaps, with no spans yet; `pos` is where field data starts.
    fn decode_header(buf: Bytes) -> Result<(Message, usize), DecodeError> {
        if buf.len() > usize::from(u16::MAX) {
            return Err(DecodeError::TooLong { len: buf.len() });
        }
        let bytes = &buf[..];
        if bytes.len() < MTI_LEN {
            return Err(DecodeError::Truncated { what: "MTI" });
        }
        let mti = Mti::parse(&bytes[..MTI_LEN]).map_err(|_| DecodeError::BadMti)?;
        let mut pos = MTI_LEN;
        let mut announced = [0u64; 2];
        announced[0] = read_bitmap(bytes, &mut pos, "primary bitmap")?;
        if announced[0] >> 63 == 1 {
            announced[1] = read_bitmap(bytes, &mut pos, "secondary bitmap")?;
        }
        // Field 1 is the secondary bitmap itself, not data; `encode` recomputes it.
        announced[0] &= !(1u64 << 63);
        let message = Message {
            mti,
            present: announced,
            starts: [0; MAX_FIELD as usize + 1],
            data: buf,
        };
        Ok((message, pos))
    }

    /// Reads the announced fields from `pos` on. On the first bad field, it and every field
    /// after it are dropped from `present`, and the error is returned.
    fn decode_fields(&mut self, mut pos: usize) -> Option<DecodeError> {
        let bytes = &self.data[..];
        for number in SetFields::new(&self.present) {
            let spec = &spec::FIELDS[usize::from(number - 1)];
            match read_field(bytes, &mut pos, spec) {
                Ok(start) => self.starts[usize::from(number)] = start,
                Err(reason) => {
                    keep_fields_below(&mut self.present, number);
                    return Some(DecodeError::Field { number, reason });
                }
            }
        }
        (pos != bytes.len()).then(|| DecodeError::TrailingBytes {
            count: bytes.len() - pos,
        })
    }

    /// The message type indicator.
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Whether field `number` is present. Field 1 (the secondary bitmap) is never reported.
    pub fn has(&self, number: u8) -> bool {
        (2..=MAX_FIELD).contains(&number) && bit_is_set(&self.present, number)
    }

    /// The raw bytes of field `number` (without its length prefix), if present.
    pub fn get(&self, number: u8) -> Option<&[u8]> {
        if !self.has(number) {
            return None;
        }
        Some(&self.data[value_range(&self.data, &self.starts, number)])
    }

    /// Field `number` as a cheap reference-counted slice of the message buffer.
    pub fn get_bytes(&self, number: u8) -> Option<Bytes> {
        if !self.has(number) {
            return None;
        }
        Some(
            self.data
                .slice(value_range(&self.data, &self.starts, number)),
        )
    }

    /// Field `number` as text, if present and ASCII (the codec checked ASCII fields on the
    /// way in, so this fails only for binary fields holding non-ASCII bytes).
    pub fn get_str(&self, number: u8) -> Option<&str> {
        self.get(number).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The numbers of the present fields, ascending.
    pub fn field_numbers(&self) -> impl Iterator<Item = u8> + '_ {
        SetFields::new(&self.present)
    }

    /// A builder holding a copy of this message's fields, to derive a changed message
    /// (the switch's own STAN towards an acquirer, say).
    pub fn to_builder(&self) -> MessageBuilder {
        MessageBuilder {
            mti: self.mti,
            present: self.present,
            starts: self.starts,
            data: BytesMut::from(&self.data[..]),
        }
    }

    /// Encoded size in bytes (without the frame header).
    pub fn encoded_len(&self) -> usize {
        let mut len = MTI_LEN + BITMAP_LEN;
        if self.present[1] != 0 {
            len += BITMAP_LEN;
        }
        for number in self.field_numbers() {
            len += wire_range(&self.data, &self.starts, number).len();
        }
        len
    }

    /// Appends the encoded message (without the frame header) to `out`.
    ///
    /// Every field was checked against the spec when it was decoded or set, so encoding
    /// cannot fail.
    pub fn encode(&self, out: &mut BytesMut) {
        // An upper bound, cheaper than `encoded_len`'s pass over the fields: every field's
        // data lies in `data`, and no length prefix is longer than three digits.
        let fields = (self.present[0].count_ones() + self.present[1].count_ones()) as usize;
        out.reserve(MTI_LEN + 2 * BITMAP_LEN + self.data.len() + 3 * fields);
        out.put_slice(self.mti.as_bytes());
        let secondary = self.present[1] != 0;
        let primary = if secondary {
            self.present[0] | (1u64 << 63)
        } else {
            self.present[0]
        };
        out.put_u64(primary);
        if secondary {
            out.put_u64(self.present[1]);
        }
        for number in self.field_numbers() {
            out.put_slice(&self.data[wire_range(&self.data, &self.starts, number)]);
        }
    }

    /// Appends the message with its 2-byte big-endian frame header to `out`.
    pub fn encode_framed(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        // Encode first and write the length after: one pass over the fields, not two.
        let start = out.len();
        out.put_u16(0);
        self.encode(out);
        let len = out.len() - start - 2;
        let Ok(header) = u16::try_from(len) else {
            out.truncate(start);
            return Err(EncodeError::FrameTooLarge { len });
        };
        out[start..start + 2].copy_from_slice(&header.to_be_bytes());
        Ok(())
    }

    /// The encoded message as a new buffer, for tooling and tests.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }
}

fn read_bitmap(bytes: &[u8], pos: &mut usize, what: &'static str) -> Result<u64, DecodeError> {
    let end = *pos + BITMAP_LEN;
    let raw = bytes
        .get(*pos..end)
        .ok_or(DecodeError::Truncated { what })?;
    *pos = end;
    let mut array = [0u8; BITMAP_LEN];
    array.copy_from_slice(raw);
    Ok(u64::from_be_bytes(array))
}

/// Where the value of present field `number` lies in `data`. The prefix digits before it
/// were checked by `read_field` or written by `MessageBuilder::set`.
fn value_range(
    data: &[u8],
    starts: &[u16; MAX_FIELD as usize + 1],
    number: u8,
) -> std::ops::Range<usize> {
    let wire = wire_range(data, starts, number);
    let digits = spec::FIELDS[usize::from(number - 1)].prefix.digits();
    wire.start + digits..wire.end
}

/// Where field `number` lies on the wire in `data`: length prefix and value.
fn wire_range(
    data: &[u8],
    starts: &[u16; MAX_FIELD as usize + 1],
    number: u8,
) -> std::ops::Range<usize> {
    let spec = &spec::FIELDS[usize::from(number - 1)];
    let start = usize::from(starts[usize::from(number)]);
    let digit = |i: usize| usize::from(data[i].wrapping_sub(b'0'));
    match spec.prefix {
        LengthPrefix::Fixed => start..start + usize::from(spec.max_len),
        LengthPrefix::LlVar => start - 2..start + digit(start - 2) * 10 + digit(start - 1),
        LengthPrefix::LllVar => {
            start - 3..start + digit(start - 3) * 100 + digit(start - 2) * 10 + digit(start - 1)
        }
    }
}

/// Reads one field at `pos` and returns the offset of its value.
fn read_field(bytes: &[u8], pos: &mut usize, spec: &FieldSpec) -> Result<u16, FieldError> {
    let len = match spec.prefix {
        LengthPrefix::Fixed => usize::from(spec.max_len),
        prefix => {
            let digits = prefix.digits();
            let raw = bytes
                .get(*pos..*pos + digits)
                .ok_or(FieldError::Truncated {
                    need: digits,
                    have: bytes.len() - *pos,
                })?;
            *pos += digits;
            let len = parse_decimal(raw).ok_or(FieldError::BadLengthPrefix)?;
            if len > usize::from(spec.max_len) {
                return Err(FieldError::TooLong {
                    len,
                    max: spec.max_len,
                });
            }
            len
        }
    };
    let data = bytes.get(*pos..*pos + len).ok_or(FieldError::Truncated {
        need: len,
        have: bytes.len() - *pos,
    })?;
    check_encoding(spec, data)?;
    // Messages are at most u16::MAX bytes (checked in `decode_header`), so it fits.
    let start = *pos as u16;
    *pos += len;
    Ok(start)
}

fn check_encoding(spec: &FieldSpec, data: &[u8]) -> Result<(), FieldError> {
    // `<[u8]>::is_ascii` checks a word at a time; the offset is looked for only on failure.
    if spec.encoding == Encoding::Ascii && !data.is_ascii() {
        let offset = data.iter().position(|b| !b.is_ascii()).unwrap_or_default();
        return Err(FieldError::NotAscii { offset });
    }
    Ok(())
}

fn parse_decimal(raw: &[u8]) -> Option<usize> {
    raw.iter().try_fold(0usize, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + usize::from(b - b'0'))
    })
}

fn put_length_prefix(out: &mut BytesMut, prefix: LengthPrefix, len: usize) {
    match prefix {
        LengthPrefix::Fixed => {}
        LengthPrefix::LlVar => {
            out.put_slice(&[b'0' + (len / 10) as u8, b'0' + (len % 10) as u8]);
        }
        LengthPrefix::LllVar => {
            out.put_slice(&[
                b'0' + (len / 100) as u8,
                b'0' + (len / 10 % 10) as u8,
                b'0' + (len % 10) as u8,
            ]);
        }
    }
}

/// Builds a [`Message`] field by field; every field is checked against the spec as it is
/// set, so a built message always encodes.
#[derive(Debug)]
pub struct MessageBuilder {
    mti: Mti,
    present: [u64; 2],
    starts: [u16; MAX_FIELD as usize + 1],
    data: BytesMut,
}

impl MessageBuilder {
    /// Typical response size; saves regrowing the buffer on the hot path.
    const INITIAL_CAPACITY: usize = 256;

    fn new(mti: Mti) -> MessageBuilder {
        MessageBuilder {
            mti,
            present: [0; 2],
            starts: [0; MAX_FIELD as usize + 1],
            data: BytesMut::with_capacity(Self::INITIAL_CAPACITY),
        }
    }

    /// Changes the message type (a repeat of a message sent before, say).
    pub fn set_mti(&mut self, mti: Mti) -> &mut Self {
        self.mti = mti;
        self
    }

    /// Sets field `number` (2..=128) to `value`, replacing any earlier value.
    pub fn set(&mut self, number: u8, value: &[u8]) -> Result<&mut Self, EncodeError> {
        let spec = spec::field(number)
            .filter(|_| number >= 2)
            .ok_or(EncodeError::NoSuchField { number })?;
        let bad = |reason| EncodeError::Field { number, reason };
        match spec.prefix {
            LengthPrefix::Fixed if value.len() != usize::from(spec.max_len) => {
                return Err(bad(FieldError::WrongLength {
                    len: value.len(),
                    expected: spec.max_len,
                }));
            }
            _ if value.len() > usize::from(spec.max_len) => {
                return Err(bad(FieldError::TooLong {
                    len: value.len(),
                    max: spec.max_len,
                }));
            }
            _ => {}
        }
        check_encoding(spec, value).map_err(bad)?;
        let end = self.data.len() + spec.prefix.digits() + value.len();
        if end > usize::from(u16::MAX) {
            return Err(EncodeError::FrameTooLarge { len: end });
        }
        put_length_prefix(&mut self.data, spec.prefix, value.len());
        let start = self.data.len();
        self.data.extend_from_slice(value);
        self.starts[usize::from(number)] = start as u16;
        set_bit(&mut self.present, number);
        Ok(self)
    }

    /// Sets an ASCII field from text.
    pub fn set_str(&mut self, number: u8, value: &str) -> Result<&mut Self, EncodeError> {
        self.set(number, value.as_bytes())
    }

    /// Copies fields from `other` where present there; absent ones are skipped.
    pub fn copy_from(&mut self, other: &Message, numbers: &[u8]) -> Result<&mut Self, EncodeError> {
        for &number in numbers {
            if let Some(value) = other.get(number) {
                self.set(number, value)?;
            }
        }
        Ok(self)
    }

    /// Finishes the message.
    pub fn build(&mut self) -> Message {
        Message {
            mti: self.mti,
            present: self.present,
            starts: self.starts,
            data: std::mem::take(&mut self.data).freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 0100 example of DESIGN.md.
    pub(crate) const DESIGN_EXAMPLE_HEX: &str = "303130307220440008c0800031363431313131313131313131313131313130303030303030303030303030313235303031313235313233303435303030303031353431313035313533333031323030303030315445524d303030314d45524348414e5430303030303031383430";

    fn example() -> Bytes {
        Bytes::from(hex::decode(DESIGN_EXAMPLE_HEX).unwrap())
    }

    #[test]
    fn design_example_decodes_to_the_listed_fields() {
        let msg = Message::decode(example()).unwrap();
        assert_eq!(msg.mti().as_str(), "0100");
        let expected: &[(u8, &str)] = &[
            (2, "4111111111111111"),
            (3, "000000"),
            (4, "000000012500"),
            (7, "1125123045"),
            (11, "000001"),
            (18, "5411"),
            (22, "051"),
            (37, "533012000001"),
            (41, "TERM0001"),
            (42, "MERCHANT0000001"),
            (49, "840"),
        ];
        assert_eq!(
            msg.field_numbers().collect::<Vec<_>>(),
            expected.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
        for (number, value) in expected {
            assert_eq!(msg.get_str(*number), Some(*value), "field {number}");
        }
    }

    #[test]
    fn design_example_reencodes_byte_identical() {
        let raw = example();
        assert_eq!(raw.len(), 109);
        let msg = Message::decode(raw.clone()).unwrap();
        assert_eq!(msg.to_bytes(), raw);
        assert_eq!(msg.encoded_len(), 109);
    }

    #[test]
    fn decoded_fields_borrow_the_frame_buffer() {
        let raw = example();
        let msg = Message::decode(raw.clone()).unwrap();
        let pan = msg.get(2).unwrap();
        let frame = raw.as_ptr_range();
        assert!(
            frame.contains(&pan.as_ptr()),
            "field data must not be copied"
        );
    }

    #[test]
    fn secondary_bitmap_round_trips() {
        let msg = Message::builder(Mti::parse(b"0800").unwrap())
            .set_str(7, "1125123045")
            .unwrap()
            .set_str(11, "000001")
            .unwrap()
            .set_str(70, "301")
            .unwrap()
            .build();
        let raw = msg.to_bytes();
        // MTI + primary + secondary + 10 + 6 + 3.
        assert_eq!(raw.len(), 4 + 8 + 8 + 19);
        assert_eq!(raw[4] & 0x80, 0x80, "bit 1 announces the secondary bitmap");
        let back = Message::decode(raw).unwrap();
        assert_eq!(back.get_str(70), Some("301"));
        assert!(!back.has(1));
    }

    #[test]
    fn builder_refuses_values_the_spec_forbids() {
        let mut b = Message::builder(Mti::parse(b"0110").unwrap());
        assert!(matches!(
            b.set_str(39, "0"),
            Err(EncodeError::Field {
                number: 39,
                reason: FieldError::WrongLength {
                    len: 1,
                    expected: 2
                }
            })
        ));
        assert!(matches!(
            b.set_str(2, "41111111111111111111"),
            Err(EncodeError::Field {
                number: 2,
                reason: FieldError::TooLong { len: 20, max: 19 }
            })
        ));
        assert!(matches!(
            b.set(41, "TERMé001".as_bytes()),
            Err(EncodeError::Field { number: 41, .. })
        ));
        assert!(matches!(
            b.set_str(1, "00000000"),
            Err(EncodeError::NoSuchField { number: 1 })
        ));
        assert!(matches!(
            b.set_str(0, "x"),
            Err(EncodeError::NoSuchField { number: 0 })
        ));
    }

    #[test]
    fn truncated_and_malformed_inputs_give_typed_errors() {
        let raw = example();
        assert!(matches!(
            Message::decode(raw.slice(..3)),
            Err(DecodeError::Truncated { what: "MTI" })
        ));
        assert!(matches!(
            Message::decode(raw.slice(..10)),
            Err(DecodeError::Truncated {
                what: "primary bitmap"
            })
        ));
        // Cut inside field 42 (the second to last field).
        assert!(matches!(
            Message::decode(raw.slice(..100)),
            Err(DecodeError::Field {
                number: 42,
                reason: FieldError::Truncated { .. }
            })
        ));
        let mut bad_mti = raw.to_vec();
        bad_mti[0] = b'X';
        assert!(matches!(
            Message::decode(bad_mti.into()),
            Err(DecodeError::BadMti)
        ));
        let mut bad_prefix = raw.to_vec();
        bad_prefix[12] = b'A'; // first digit of field 2's LL prefix
        assert!(matches!(
            Message::decode(bad_prefix.into()),
            Err(DecodeError::Field {
                number: 2,
                reason: FieldError::BadLengthPrefix
            })
        ));
        let mut too_long = raw.to_vec();
        too_long[12] = b'9'; // LL = 96 > 19
        assert!(matches!(
            Message::decode(too_long.into()),
            Err(DecodeError::Field {
                number: 2,
                reason: FieldError::TooLong { len: 96, max: 19 }
            })
        ));
        let mut trailing = raw.to_vec();
        trailing.push(b'0');
        assert!(matches!(
            Message::decode(trailing.into()),
            Err(DecodeError::TrailingBytes { count: 1 })
        ));
        let mut not_ascii = raw.to_vec();
        *not_ascii.last_mut().unwrap() = 0xff;
        assert!(matches!(
            Message::decode(not_ascii.into()),
            Err(DecodeError::Field {
                number: 49,
                reason: FieldError::NotAscii { offset: 2 }
            })
        ));
    }

    #[test]
    fn decode_prefix_keeps_the_fields_before_the_bad_one() {
        let mut raw = example().to_vec();
        raw[100] = 0xff; // inside field 42
        let (partial, error) = Message::decode_prefix(raw.into()).unwrap();
        assert_eq!(error.and_then(|e| e.field()), Some(42));
        assert_eq!(partial.get_str(41), Some("TERM0001"));
        assert_eq!(partial.get_str(11), Some("000001"));
        assert!(!partial.has(42));
        assert!(!partial.has(49));
    }

    #[test]
    fn a_bad_field_drops_it_and_every_field_after_it_across_bitmaps() {
        let mut b = Message::builder(Mti::NETWORK_REQUEST);
        b.set_str(11, "000001").unwrap();
        b.set(64, b"\x01\x02\x03\x04\x05\x06\x07\x08").unwrap();
        b.set_str(70, "301").unwrap();
        b.set_str(100, "12345").unwrap();
        let mut raw = b.build().to_bytes().to_vec();
        let at = raw.len() - 2 - 5 - 3; // first byte of field 70
        raw[at] = 0xff;
        let (partial, error) = Message::decode_prefix(raw.into()).unwrap();
        assert_eq!(error.and_then(|e| e.field()), Some(70));
        assert_eq!(partial.field_numbers().collect::<Vec<_>>(), vec![11, 64]);
        let mut present = [!0u64, !0u64];
        keep_fields_below(&mut present, 65);
        assert_eq!(present, [!0u64, 0]);
        keep_fields_below(&mut present, 2);
        assert_eq!(present, [1u64 << 63, 0]);
    }

    #[test]
    fn debug_output_never_shows_field_data() {
        let msg = Message::decode(example()).unwrap();
        let shown = format!("{msg:?}");
        assert!(!shown.contains("4111111111111111"), "{shown}");
        assert!(shown.contains("0100"));
    }
}
