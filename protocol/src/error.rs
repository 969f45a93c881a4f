//! Typed errors of the codec. Each names the field and the reason; none carries field data,
//! so an error can be logged without leaking a PAN.

use thiserror::Error;

/// Why one field could not be read or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FieldError {
    /// The message ended before the field did.
    #[error("truncated: needs {need} bytes, {have} left")]
    Truncated {
        /// Bytes the field (or its length prefix) needs.
        need: usize,
        /// Bytes left in the message.
        have: usize,
    },
    /// The LL/LLL length prefix is not ASCII decimal digits.
    #[error("length prefix is not decimal digits")]
    BadLengthPrefix,
    /// The declared or given length exceeds the field's maximum.
    #[error("length {len} exceeds the maximum {max}")]
    TooLong {
        /// Length found.
        len: usize,
        /// Maximum the spec allows.
        max: u16,
    },
    /// A fixed-length field of the wrong length.
    #[error("length {len}, the field is fixed at {expected}")]
    WrongLength {
        /// Length given.
        len: usize,
        /// The field's fixed length.
        expected: u16,
    },
    /// An ASCII field holds a byte above 0x7f.
    #[error("non-ASCII byte at offset {offset}")]
    NotAscii {
        /// Offset of the first offending byte within the field.
        offset: usize,
    },
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The message ended inside its header.
    #[error("truncated {what}")]
    Truncated {
        /// The part that was cut: "MTI", "primary bitmap", "secondary bitmap".
        what: &'static str,
    },
    /// The MTI is not four ASCII digits.
    #[error("MTI is not four ASCII digits")]
    BadMti,
    /// One field is malformed.
    #[error("field {number}: {reason}")]
    Field {
        /// Field number.
        number: u8,
        /// What is wrong with it.
        reason: FieldError,
    },
    /// Bytes remain after the last field the bitmaps announce.
    #[error("{count} bytes after the last field")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// Longer than any frame can be.
    #[error("message of {len} bytes exceeds 65535")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

impl DecodeError {
    /// The field the error is about, when it is about one.
    pub fn field(&self) -> Option<u8> {
        match self {
            DecodeError::Field { number, .. } => Some(*number),
            _ => None,
        }
    }
}

/// Why a message could not be built or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// Field number outside 2..=128 (field 1, the secondary bitmap, is implied).
    #[error("no field {number}: data fields are 2..=128")]
    NoSuchField {
        /// The number given.
        number: u8,
    },
    /// The value does not fit the field's spec.
    #[error("field {number}: {reason}")]
    Field {
        /// Field number.
        number: u8,
        /// What is wrong with the value.
        reason: FieldError,
    },
    /// The encoded message would not fit a 2-byte frame header.
    #[error("message of {len} bytes does not fit a frame")]
    FrameTooLarge {
        /// Its length.
        len: usize,
    },
}

/// Why a value of a typed field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ValueError {
    /// Wrong number of characters.
    #[error("expected {expected} characters, got {len}")]
    Length {
        /// Characters required (or allowed maximum, for PANs).
        expected: &'static str,
        /// Characters found.
        len: usize,
    },
    /// A character that the field does not allow.
    #[error("invalid character at offset {offset}")]
    Character {
        /// Offset of the first bad character.
        offset: usize,
    },
    /// A PAN whose Luhn check digit is wrong.
    #[error("PAN fails the Luhn check")]
    Luhn,
    /// A part of the value outside its range (a month 13, an hour 24).
    #[error("out of range at offset {offset}")]
    OutOfRange {
        /// Offset of the part's first character.
        offset: usize,
    },
}

/// Why a frame could not be taken from a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length header announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A zero-length frame: nothing to answer.
    #[error("empty frame")]
    Empty,
}
