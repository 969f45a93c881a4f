//! ISO 8583:1987 for payswitch: the field table, the codec, framing and typed values.
//!
//! This crate is sans-IO: it turns bytes into messages and back and never touches a socket
//! or a clock, so it is tested deterministically and fuzzed.
//!
//! - [`spec`]: the 128 data elements exactly as in the shared `iso8583-fields.tsv`.
//! - [`message`]: [`Message`] decoding (zero-copy over a `Bytes` frame), [`MessageBuilder`]
//!   and encoding into a caller's buffer.
//! - [`framing`]: the 2-byte big-endian network header with a configurable size limit.
//! - [`types`]: newtypes for what the switch reads — [`Pan`] (Luhn-checked, never printed in
//!   full), [`Stan`], [`Rrn`], [`AmountMinor`], [`CurrencyCode`], [`Mcc`], [`Mti`] — and the
//!   [`ResponseCode`]s of the wire contract.
//! - [`time`]: UTC calendar time — [`UtcDateTime`] from Unix time, field 7
//!   ([`TransmissionTime`]) and the year it belongs to. The caller passes the time in.
//! - [`error`]: typed errors that name the field and the reason, never its data.

pub mod error;
pub mod framing;
pub mod message;
pub mod spec;
pub mod time;
pub mod types;

pub use error::{DecodeError, EncodeError, FieldError, FrameError, ValueError};
pub use framing::{encode_frame, FrameDecoder, DEFAULT_MAX_FRAME};
pub use message::{Message, MessageBuilder};
pub use time::{TransmissionTime, UtcDateTime};
pub use types::{AmountMinor, CurrencyCode, Mcc, Mti, Pan, ResponseCode, Rrn, Stan};

/// Field numbers of the data elements the switch reads or writes, by name.
pub mod fields {
    /// Primary account number.
    pub const PAN: u8 = 2;
    /// Processing code.
    pub const PROCESSING_CODE: u8 = 3;
    /// Amount, transaction (minor units).
    pub const AMOUNT: u8 = 4;
    /// Transmission date and time, MMDDhhmmss.
    pub const TRANSMISSION_TIME: u8 = 7;
    /// System trace audit number.
    pub const STAN: u8 = 11;
    /// Expiration date, YYMM.
    pub const EXPIRY: u8 = 14;
    /// Merchant type (MCC).
    pub const MCC: u8 = 18;
    /// Point-of-service entry mode.
    pub const POS_ENTRY_MODE: u8 = 22;
    /// Retrieval reference number.
    pub const RRN: u8 = 37;
    /// Authorization ID response (approval code).
    pub const APPROVAL_CODE: u8 = 38;
    /// Response code.
    pub const RESPONSE_CODE: u8 = 39;
    /// Card acceptor terminal ID.
    pub const TERMINAL: u8 = 41;
    /// Card acceptor ID (merchant).
    pub const MERCHANT: u8 = 42;
    /// Additional data, private: the switch's tagged text.
    pub const PRIVATE_DATA: u8 = 48;
    /// Currency code, transaction.
    pub const CURRENCY: u8 = 49;
    /// Network management information code.
    pub const NETWORK_CODE: u8 = 70;
    /// Original data elements (reversals).
    pub const ORIGINAL_DATA: u8 = 90;

    /// Fields a response echoes from its request (DESIGN.md, wire protocol).
    pub const ECHOED: [u8; 9] = [2, 3, 4, 7, 11, 37, 41, 42, 49];
    /// Fields a 0100/0200 must carry, well formed, or it is answered 30.
    pub const REQUIRED_FOR_AUTHORIZATION: [u8; 9] = [2, 3, 4, 7, 11, 37, 41, 42, 49];
}
