//! ISO 8583 messages as hex lines <-> JSON lines: what `payswitch iso decode|encode` runs.
//!
//! Tooling for gateway teams: it prints the messages it is given, PAN included — that is
//! its job. Its *errors* never carry field data: every reason comes from the codec's typed
//! errors (field number and why) or from the fixed texts below, so a bad line holding a
//! full PAN can be reported in a ticket without leaking it.
//!
//! The JSON form is `{"mti":"0100","fields":{"2":"4111111111111111","55":"9f2608..."}}`:
//! keys are field numbers in ascending numeric order, ASCII fields as strings, binary
//! fields (PIN block, ICC data, MACs) as lowercase hex. Bitmaps are implied by the fields.

use std::io::{self, BufRead, Write};

use bytes::Bytes;
use payswitch_protocol::spec::{self, Encoding};
use payswitch_protocol::{DecodeError, EncodeError, Message, Mti, ValueError};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// Longest input line read, in bytes. The largest frame is 65 535 bytes, i.e. 131 070 hex
/// digits; as JSON a control byte in an ASCII field takes up to six characters (`\u0001`),
/// so 512 KiB holds any message either way, and a runaway line cannot eat the memory.
const MAX_LINE_BYTES: usize = 512 * 1024;

/// Longest JSON field key taken as a number and named in errors. Field numbers have at most
/// three digits; a longer key is not echoed, since it could be a PAN pasted in the wrong place.
const MAX_FIELD_KEY_DIGITS: usize = 3;

/// Why a hex string could not be read. Says where, never which character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// An odd number of hex digits.
    #[error("odd number of hex digits ({len})")]
    OddLength {
        /// Digits found.
        len: usize,
    },
    /// A character that is not a hex digit.
    #[error("not a hex digit at offset {offset}")]
    BadDigit {
        /// Offset of the first offending character.
        offset: usize,
    },
}

/// Why a JSON value is not a message. No variant carries field data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsoJsonError {
    /// The value is not a JSON object.
    #[error("not a JSON object")]
    NotObject,
    /// A top-level key other than "mti" and "fields".
    #[error("unexpected top-level key (only \"mti\" and \"fields\" are allowed)")]
    UnexpectedKey,
    /// "mti" is missing or not a string.
    #[error("\"mti\" missing or not a string")]
    MissingMti,
    /// The MTI is not four ASCII digits.
    #[error("MTI: {0}")]
    BadMti(ValueError),
    /// "fields" is missing or not an object.
    #[error("\"fields\" missing or not an object")]
    MissingFields,
    /// A field key that is not a decimal number of at most three digits.
    #[error("field key of {len} characters is not a field number 2..=128")]
    BadFieldKey {
        /// Characters in the key.
        len: usize,
    },
    /// A field number outside 2..=128.
    #[error("no field {number}: data fields are 2..=128")]
    NoSuchField {
        /// The number given.
        number: u16,
    },
    /// A field value that is not a JSON string.
    #[error("field {number}: value is not a JSON string")]
    NotString {
        /// Field number.
        number: u8,
    },
    /// A binary field whose value is not hex.
    #[error("field {number}: binary value is not hex: {reason}")]
    NotHex {
        /// Field number.
        number: u8,
        /// What is wrong with the hex.
        reason: HexError,
    },
    /// The codec refused the value.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Why one input line was refused.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than `MAX_LINE_BYTES`.
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    /// The hex of a message is malformed.
    #[error("not hex: {0}")]
    Hex(HexError),
    /// The bytes are not a valid message.
    #[error("{0}")]
    Decode(DecodeError),
    /// The line is not JSON. serde_json's syntax errors give a position, never content.
    #[error("bad JSON: {0}")]
    Json(serde_json::Error),
    /// The JSON is not a valid message.
    #[error("{0}")]
    Message(IsoJsonError),
}

/// Decodes lowercase or uppercase hex, surrounding whitespace not included.
pub fn decode_hex(text: &[u8]) -> Result<Vec<u8>, HexError> {
    let pairs = text.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return Err(HexError::OddLength { len: text.len() });
    }
    let digit = |offset: usize| -> Result<u8, HexError> {
        match text[offset] {
            b @ b'0'..=b'9' => Ok(b - b'0'),
            b @ b'a'..=b'f' => Ok(b - b'a' + 10),
            b @ b'A'..=b'F' => Ok(b - b'A' + 10),
            _ => Err(HexError::BadDigit { offset }),
        }
    };
    (0..pairs.len())
        .map(|i| Ok(digit(2 * i)? << 4 | digit(2 * i + 1)?))
        .collect()
}

/// Serializes a message's fields in ascending numeric order, which a JSON object map keyed
/// by strings would not keep ("11" sorts before "2").
struct FieldsInOrder<'a>(&'a Message);

impl Serialize for FieldsInOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let message = self.0;
        let mut map = serializer.serialize_map(None)?;
        for number in message.field_numbers() {
            let raw = message.get(number).unwrap_or_default();
            map.serialize_entry(&number.to_string(), &field_text(number, raw))?;
        }
        map.end()
    }
}

/// The JSON text of one field: hex for binary fields, the characters for ASCII ones.
fn field_text(number: u8, raw: &[u8]) -> String {
    match spec::field(number).map(|s| s.encoding) {
        Some(Encoding::Ascii) => String::from_utf8_lossy(raw).into_owned(),
        _ => hex::encode(raw),
    }
}

/// A message as one JSON line, MTI first, fields in ascending numeric order.
struct JsonLine<'a>(&'a Message);

impl Serialize for JsonLine<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("mti", self.0.mti().as_str())?;
        map.serialize_entry("fields", &FieldsInOrder(self.0))?;
        map.end()
    }
}

/// The JSON form of a message (see the module doc).
pub fn message_to_json(message: &Message) -> Value {
    let mut fields = serde_json::Map::new();
    for number in message.field_numbers() {
        let raw = message.get(number).unwrap_or_default();
        fields.insert(number.to_string(), Value::from(field_text(number, raw)));
    }
    let mut object = serde_json::Map::new();
    object.insert("mti".into(), Value::from(message.mti().as_str()));
    object.insert("fields".into(), Value::Object(fields));
    Value::Object(object)
}

/// A message from its JSON form; every field is checked against the spec.
pub fn message_from_json(value: &Value) -> Result<Message, IsoJsonError> {
    let object = value.as_object().ok_or(IsoJsonError::NotObject)?;
    if object.keys().any(|k| k != "mti" && k != "fields") {
        return Err(IsoJsonError::UnexpectedKey);
    }
    let mti = object
        .get("mti")
        .and_then(Value::as_str)
        .ok_or(IsoJsonError::MissingMti)?;
    let mti = Mti::parse(mti.as_bytes()).map_err(IsoJsonError::BadMti)?;
    let fields = object
        .get("fields")
        .and_then(Value::as_object)
        .ok_or(IsoJsonError::MissingFields)?;
    let mut builder = Message::builder(mti);
    for (key, value) in fields {
        let number = field_number(key)?;
        let text = value.as_str().ok_or(IsoJsonError::NotString { number })?;
        match spec::field(number).map(|s| s.encoding) {
            Some(Encoding::Binary) => {
                let raw = decode_hex(text.as_bytes())
                    .map_err(|reason| IsoJsonError::NotHex { number, reason })?;
                builder.set(number, &raw)?
            }
            _ => builder.set(number, text.as_bytes())?,
        };
    }
    Ok(builder.build())
}

/// A field key as a field number 2..=128. Only canonical decimal is taken ("2", not "02"),
/// so two keys cannot name the same field.
fn field_number(key: &str) -> Result<u8, IsoJsonError> {
    let canonical = !key.is_empty()
        && key.len() <= MAX_FIELD_KEY_DIGITS
        && key.bytes().all(|b| b.is_ascii_digit())
        && (key == "0" || !key.starts_with('0'));
    if !canonical {
        return Err(IsoJsonError::BadFieldKey {
            len: key.chars().count(),
        });
    }
    let number: u16 = key
        .parse()
        .map_err(|_| IsoJsonError::BadFieldKey { len: key.len() })?;
    match u8::try_from(number) {
        Ok(n) if (2..=spec::MAX_FIELD).contains(&n) => Ok(n),
        _ => Err(IsoJsonError::NoSuchField { number }),
    }
}

/// One `decode` input line (hex, whitespace trimmed) to its JSON line.
pub fn decode_line(line: &[u8]) -> Result<String, LineError> {
    let raw = decode_hex(line.trim_ascii()).map_err(LineError::Hex)?;
    let message = Message::decode(Bytes::from(raw)).map_err(LineError::Decode)?;
    Ok(serde_json::to_string(&JsonLine(&message))
        .expect("a map of strings always serializes to JSON"))
}

/// One `encode` input line (JSON) to the message's lowercase hex.
pub fn encode_line(line: &[u8]) -> Result<String, LineError> {
    let value: Value = serde_json::from_slice(line.trim_ascii()).map_err(LineError::Json)?;
    let message = message_from_json(&value).map_err(LineError::Message)?;
    Ok(hex::encode(message.to_bytes()))
}

/// What [`read_line_bounded`] found.
enum Line {
    /// A whole line (newline stripped) is in the buffer.
    Complete,
    /// The line was longer than the bound; it was read to its end and dropped.
    TooLong,
    /// End of input.
    End,
}

/// Reads one line into `line`, keeping at most `max` bytes of it.
fn read_line_bounded(input: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(match (read_any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong,
                (true, false) => Line::Complete,
            });
        }
        read_any = true;
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if line.len() + chunk.len() > max {
            too_long = true;
            line.clear();
        } else if !too_long {
            line.extend_from_slice(chunk);
        }
        let consumed = done.unwrap_or(available.len());
        input.consume(consumed);
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

/// Converts every line of `input` with `convert`, printing results to `output` and one
/// error line per bad input line to `errors`. Returns whether every line converted.
pub fn run_lines(
    input: &mut impl BufRead,
    output: &mut impl Write,
    errors: &mut impl Write,
    convert: fn(&[u8]) -> Result<String, LineError>,
) -> io::Result<bool> {
    let mut line = Vec::new();
    let mut all_ok = true;
    let mut line_number = 0u64;
    loop {
        line_number += 1;
        let result = match read_line_bounded(input, &mut line, MAX_LINE_BYTES)? {
            Line::End => return Ok(all_ok),
            Line::TooLong => Err(LineError::TooLong),
            Line::Complete if line.trim_ascii().is_empty() => continue,
            Line::Complete => convert(&line),
        };
        match result {
            Ok(text) => writeln!(output, "{text}")?,
            Err(error) => {
                all_ok = false;
                // Nothing useful is left to do if stderr itself is gone.
                let _ = writeln!(errors, "line {line_number}: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE_HEX: &str = "303130307220440008c0800031363431313131313131313131313131313130303030303030303030303030313235303031313235313233303435303030303031353431313035313533333031323030303030315445524d303030314d45524348414e5430303030303031383430";

    #[test]
    fn hex_errors_say_where_not_what() {
        assert_eq!(decode_hex(b"0a0"), Err(HexError::OddLength { len: 3 }));
        assert_eq!(decode_hex(b"0aZz"), Err(HexError::BadDigit { offset: 2 }));
        assert_eq!(decode_hex(b"0aFf").unwrap(), vec![0x0a, 0xff]);
        let shown = HexError::BadDigit { offset: 2 }.to_string();
        assert!(!shown.contains('Z'), "{shown}");
    }

    #[test]
    fn design_example_round_trips_through_json() {
        let line = decode_line(DESIGN_EXAMPLE_HEX.as_bytes()).unwrap();
        assert!(line.starts_with(r#"{"mti":"0100","fields":{"2":"4111111111111111","3":"#));
        assert_eq!(encode_line(line.as_bytes()).unwrap(), DESIGN_EXAMPLE_HEX);
        let message = message_from_json(&serde_json::from_str(&line).unwrap()).unwrap();
        let value = message_to_json(&message);
        assert_eq!(value["fields"]["42"], "MERCHANT0000001");
        assert_eq!(value, serde_json::from_str::<Value>(&line).unwrap());
    }

    #[test]
    fn field_keys_must_be_canonical_field_numbers() {
        assert_eq!(field_number("2"), Ok(2));
        assert_eq!(field_number("128"), Ok(128));
        assert_eq!(
            field_number("1"),
            Err(IsoJsonError::NoSuchField { number: 1 })
        );
        assert_eq!(
            field_number("200"),
            Err(IsoJsonError::NoSuchField { number: 200 })
        );
        assert_eq!(
            field_number("02"),
            Err(IsoJsonError::BadFieldKey { len: 2 })
        );
        assert_eq!(
            field_number("4111111111111111"),
            Err(IsoJsonError::BadFieldKey { len: 16 })
        );
        assert_eq!(field_number("x"), Err(IsoJsonError::BadFieldKey { len: 1 }));
    }

    #[test]
    fn overlong_lines_are_dropped_whole_and_reading_goes_on() {
        let mut input = io::Cursor::new(b"0123456789\nab\n\ncd".to_vec());
        let mut line = Vec::new();
        let mut next = || {
            let kind = read_line_bounded(&mut input, &mut line, 4).unwrap();
            let text = String::from_utf8(line.clone()).unwrap();
            match kind {
                Line::Complete => Some(text),
                Line::TooLong => Some("<too long>".into()),
                Line::End => None,
            }
        };
        assert_eq!(next().as_deref(), Some("<too long>"));
        assert_eq!(next().as_deref(), Some("ab"));
        assert_eq!(next().as_deref(), Some(""));
        assert_eq!(next().as_deref(), Some("cd"));
        assert_eq!(next(), None);
    }

    #[test]
    fn run_lines_numbers_errors_and_keeps_going() {
        let input = format!("zz\n\n{DESIGN_EXAMPLE_HEX}\n");
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let ok = run_lines(&mut input.as_bytes(), &mut out, &mut err, decode_line).unwrap();
        assert!(!ok);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "line 1: not hex: not a hex digit at offset 0\n"
        );
    }
}
