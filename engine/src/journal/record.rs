//! What the journal holds: one [`Record`] per step of an authorization's life, and the
//! frame each is stored in.
//!
//! A frame is `len: u32 LE | crc: u32 LE | seq: u64 LE | body`, where `len` counts the
//! bytes after itself (crc, seq and body), `crc` is CRC32C over `seq | body`, and `body`
//! is one format tag byte and then the record in postcard (a stable, documented serde
//! format). Sequence numbers go up by one from record to record, across segments.
//!
//! ## Record formats
//! Postcard writes a struct as its fields one after the other, so a newer format only
//! ever appends fields at the end of [`Record`]. The body's first byte names the format:
//! `0x80 + version`. Format 0 (journals written before formats were tagged) has no tag:
//! its first byte is the record kind, below `0x80`, and it is read by appending the
//! encoding of the fields added since, at their defaults. A body tagged with a version
//! this switch does not know is refused with that version named, never misread.
//!
//! | version | adds |
//! |---|---|
//! | 0 | everything up to `attempt` |
//! | 1 | `reversal_stan` |
//! | 2 | the kinds `advice_queued`, `advice_sent`, `advice_ack` (stand-in); no new field |
//! | 3 | `pan_sealed` |
//! | 4 | `event_ms`, `mcc`, `country`, `pos_entry_mode`: what velocity needs at a restart |
//!
//! No record holds a full PAN in clear, track data, a PIN block, a CVV or ICC data: the
//! card is kept as its masked form (first six, last four) and a keyed hash that links the
//! records of one card without revealing it; with `journal.pan_key_file` configured, the
//! records a reversal or advice is built from also hold the PAN sealed under a key kept
//! outside the journal (`super::vault`).

use serde::{Deserialize, Serialize};

/// Bytes before a record's body: len, crc, seq.
pub const FRAME_HEADER: usize = 16;

/// The record format this switch writes (see the module docs).
pub const RECORD_FORMAT: u8 = 4;
/// The tag of [`RECORD_FORMAT`]: the body's first byte.
const FORMAT_TAG_BASE: u8 = 0x80;
/// Encoding of the fields formats 1 to 4 added, at their defaults (`reversal_stan` 0,
/// `pan_sealed` none, `event_ms`, `mcc`, `country`, `pos_entry_mode` 0): appended to a
/// format-0 body to read it.
const FORMAT_0_TRAILER: &[u8] = &[0, 0, 0, 0, 0, 0];
/// The fields formats 3 and 4 added, at their defaults: appended to a format-1 or
/// format-2 body (format 2 added no field).
const FORMAT_1_TRAILER: &[u8] = &[0, 0, 0, 0, 0];
/// The fields format 4 added, at their defaults: appended to a format-3 body.
const FORMAT_3_TRAILER: &[u8] = &[0, 0, 0, 0];

/// Largest body accepted when reading. Records are a few hundred bytes; field 48 (at most
/// 999 bytes) is the largest part, so anything near this is corruption, not a record.
pub const MAX_RECORD_BODY: usize = 8 * 1024;

/// Which step of an authorization a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A request that passed validation, as received.
    #[default]
    Request,
    /// Sent to an acquirer (durable before it is sent).
    Forwarded,
    /// The answer sent to the gateway (durable before it is sent).
    Response,
    /// A reversal the switch owes an acquirer, now in the store-and-forward queue.
    ReversalQueued,
    /// One attempt to send a queued reversal.
    ReversalSent,
    /// The acquirer answered the reversal: it is off the queue.
    ReversalAck,
    /// A stand-in approval: the answer the gateway got (code, approval code, field 48,
    /// as on a `response`) and the advice it owes the route's first acquirer, in one
    /// record. Format 2.
    AdviceQueued,
    /// One attempt to send a queued advice. Format 2.
    AdviceSent,
    /// The acquirer answered the advice: it is off the queue. Format 2.
    AdviceAck,
    /// What this request still owed (a reversal, an advice) is another node's now: that
    /// node took this node's lease over (`cluster::takeover`); `private_data` names it.
    /// In a cluster only.
    HandedOver,
}

impl RecordKind {
    /// The name used in exports.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Request => "request",
            RecordKind::Forwarded => "forwarded",
            RecordKind::Response => "response",
            RecordKind::ReversalQueued => "reversal_queued",
            RecordKind::ReversalSent => "reversal_sent",
            RecordKind::ReversalAck => "reversal_ack",
            RecordKind::AdviceQueued => "advice_queued",
            RecordKind::AdviceSent => "advice_sent",
            RecordKind::AdviceAck => "advice_ack",
            RecordKind::HandedOver => "handed_over",
        }
    }
}

/// One journal record. Every record repeats the identity of the request it belongs to
/// (MTI, terminal, STAN, RRN, transmission time, masked PAN, amount), so each can be read
/// on its own in an export. `Default` is an empty request record, to fill in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What step this is.
    pub kind: RecordKind,
    /// Unix milliseconds when the record was made.
    pub time_ms: i64,
    /// Sequence number of the `request` record this one belongs to; 0 on a request record
    /// (its own sequence number is its frame's), and on a record appended together with
    /// its request, which names it by `request_back` instead.
    pub request_seq: u64,
    /// How many records before this one its request is, when they were appended
    /// together (the writer numbers records, so the request's number is not known
    /// before); 0 otherwise.
    pub request_back: u8,
    /// The request's MTI (a reversal the switch originates: `0400`).
    pub mti: String,
    /// Processing code (3).
    pub processing_code: String,
    /// Transmission date and time (7), `MMDDhhmmss`.
    pub transmission_time: String,
    /// The gateway's STAN (11).
    pub stan: String,
    /// Retrieval reference number (37).
    pub rrn: String,
    /// Card acceptor terminal (41).
    pub terminal: String,
    /// Card acceptor (merchant) ID (42).
    pub merchant: String,
    /// First six and last four digits, the rest masked.
    pub pan_masked: String,
    /// Keyed hash of the PAN (SipHash-2-4, 128 bits, key kept beside the journal).
    pub pan_hash: u128,
    /// Amount (4), minor units.
    pub amount_minor: u64,
    /// Currency (49), ISO 4217 numeric.
    pub currency: u16,
    /// The acquirer, where one is involved.
    pub acquirer: String,
    /// The STAN the switch used on the acquirer link for the original request: what a
    /// reversal names in field 90. 0 when not forwarded.
    pub link_stan: u32,
    /// Response code, on `response` and `reversal_ack`.
    pub code: String,
    /// Approval code (38), when approved.
    pub approval_code: String,
    /// Fraud decision: `approve`, `review`, `decline`; empty when not scored.
    pub decision: String,
    /// Fraud score of the champion, when scored.
    pub score: Option<f32>,
    /// The champion model's id, when scored.
    pub model: String,
    /// Field 48 as sent to the gateway (decision, score, model, rule, reasons, acquirer).
    pub private_data: String,
    /// A `response` to a retransmission, answered from the original.
    pub duplicate: bool,
    /// Time the switch spent on the request, microseconds (on `response`).
    pub switch_us: u64,
    /// Time the acquirer took, microseconds (on `response` and `reversal_ack`).
    pub acquirer_us: u64,
    /// Attempt number, on `reversal_sent`.
    pub attempt: u32,
    /// The STAN a reversal (or advice) the switch originates carries on the acquirer link:
    /// the same on every attempt, so a repeat (0401) is recognisably the same reversal and a late
    /// 0410 to any attempt acknowledges it. On `reversal_sent` and `reversal_ack`; 0
    /// otherwise. Format 1.
    pub reversal_stan: u32,
    /// The PAN, sealed (`super::vault`), on the records a reversal or an advice is built
    /// from: `forwarded`, `reversal_queued`, `advice_queued`; none without a PAN key file.
    /// Format 3.
    pub pan_sealed: Option<super::vault::SealedPan>,
    /// The transaction's time for the velocity windows (field 7 or the switch's clock, as
    /// `scoring.event_time` says), Unix ms; 0 when the request was not scored. Format 4.
    pub event_ms: i64,
    /// Merchant category code (18), as scored; 0 when absent. Format 4.
    pub mcc: u16,
    /// Merchant country (19), as scored; 0 when absent. Format 4.
    pub country: u16,
    /// POS entry mode (22), as scored; 0 when absent. Format 4.
    pub pos_entry_mode: u16,
}

impl Record {
    /// A record of `kind` about the same request as `self`, with the step's own fields
    /// cleared (the request's identity and its fraud decision are kept; the sealed PAN
    /// only on the kinds a reversal or advice is built from).
    pub fn follow_up(&self, kind: RecordKind, request_seq: u64, time_ms: i64) -> Record {
        let pan_sealed = matches!(
            kind,
            RecordKind::Forwarded | RecordKind::ReversalQueued | RecordKind::AdviceQueued
        )
        .then(|| self.pan_sealed.clone())
        .flatten();
        Record {
            pan_sealed,
            kind,
            time_ms,
            request_seq,
            request_back: 0,
            acquirer: String::new(),
            link_stan: 0,
            code: String::new(),
            approval_code: String::new(),
            private_data: String::new(),
            duplicate: false,
            switch_us: 0,
            acquirer_us: 0,
            attempt: 0,
            reversal_stan: 0,
            ..self.clone()
        }
    }

    /// The request's sequence number, given this record's own.
    pub fn request_of(&self, seq: u64) -> u64 {
        if self.kind == RecordKind::Request {
            seq
        } else if self.request_back > 0 {
            seq.saturating_sub(u64::from(self.request_back))
        } else {
            self.request_seq
        }
    }
}

/// Appends `record` to `out` as a frame with seq and crc still zero: the writer fills them
/// in when it orders the frame.
pub fn encode_frame(record: &Record, out: &mut Vec<u8>) -> Result<(), postcard::Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    let body_start = out.len();
    out.push(FORMAT_TAG_BASE + RECORD_FORMAT);
    match postcard::to_extend(record, std::mem::take(out)) {
        Ok(written) => *out = written,
        Err(e) => {
            // `to_extend` consumed the buffer: what was in it before is gone too, so the
            // caller's frames are dropped with this one (an encoding error is a bug).
            return Err(e);
        }
    }
    // Readers refuse bodies over MAX_RECORD_BODY as corruption: never write one.
    if out.len() - body_start > MAX_RECORD_BODY {
        out.truncate(start);
        return Err(postcard::Error::SerializeBufferFull);
    }
    let len =
        u32::try_from(out.len() - start - 4).map_err(|_| postcard::Error::SerializeBufferFull)?;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Sets the sequence number of the frame at `frame` and computes its checksum.
pub fn seal_frame(frame: &mut [u8], seq: u64) {
    frame[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the frame says it has: a write cut short.
    Truncated,
    /// The length field is impossible.
    BadLength(u32),
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the body is not a record.
    Body(String),
}

/// Reads the frame at the start of `buf`: its seq, record and total size.
pub fn decode_frame(buf: &[u8]) -> Result<(u64, Record, usize), FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Truncated);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let body_len = (len as usize).checked_sub(FRAME_HEADER - 4);
    match body_len {
        Some(n) if n <= MAX_RECORD_BODY => {}
        _ => return Err(FrameError::BadLength(len)),
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        return Err(FrameError::Truncated);
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[8..total]) != crc {
        return Err(FrameError::Checksum);
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let record = decode_body(&buf[FRAME_HEADER..total]).map_err(FrameError::Body)?;
    Ok((seq, record, total))
}

/// A record from a frame's body, in any format this switch reads.
fn decode_body(body: &[u8]) -> Result<Record, String> {
    match body.first() {
        Some(&tag) if tag == FORMAT_TAG_BASE + RECORD_FORMAT => {
            postcard::from_bytes(&body[1..]).map_err(|e| e.to_string())
        }
        Some(&tag) if (FORMAT_TAG_BASE + 1..FORMAT_TAG_BASE + RECORD_FORMAT).contains(&tag) => {
            let trailer = if tag == FORMAT_TAG_BASE + 3 {
                FORMAT_3_TRAILER
            } else {
                FORMAT_1_TRAILER
            };
            let mut upgraded = Vec::with_capacity(body.len() + trailer.len());
            upgraded.extend_from_slice(&body[1..]);
            upgraded.extend_from_slice(trailer);
            postcard::from_bytes(&upgraded)
                .map_err(|e| format!("format {} record: {e}", tag - FORMAT_TAG_BASE))
        }
        Some(&kind) if kind < FORMAT_TAG_BASE => {
            let mut upgraded = Vec::with_capacity(body.len() + FORMAT_0_TRAILER.len());
            upgraded.extend_from_slice(body);
            upgraded.extend_from_slice(FORMAT_0_TRAILER);
            postcard::from_bytes(&upgraded).map_err(|e| format!("format 0 record: {e}"))
        }
        Some(&tag) => Err(format!(
            "record format {} is newer than this switch reads ({RECORD_FORMAT}): upgrade the switch",
            tag - FORMAT_TAG_BASE
        )),
        None => Err("empty record body".to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(kind: RecordKind) -> Record {
        Record {
            kind,
            time_ms: 1_764_000_000_000,
            request_seq: 0,
            request_back: 0,
            mti: "0100".into(),
            processing_code: "000000".into(),
            transmission_time: "1125123045".into(),
            stan: "000001".into(),
            rrn: "533012000001".into(),
            terminal: "TERM0001".into(),
            merchant: "MERCHANT0000001".into(),
            pan_masked: "411111******1111".into(),
            pan_hash: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
            amount_minor: 12_500,
            currency: 840,
            acquirer: "north".into(),
            link_stan: 42,
            code: "00".into(),
            approval_code: "A1B2C3".into(),
            decision: "approve".into(),
            score: Some(0.125),
            model: "rf-0123abcd".into(),
            private_data: "decision=approve".into(),
            duplicate: false,
            switch_us: 17,
            acquirer_us: 300,
            attempt: 0,
            reversal_stan: 0,
            pan_sealed: None,
            event_ms: 1_764_000_000_000,
            mcc: 5411,
            country: 840,
            pos_entry_mode: 51,
        }
    }

    #[test]
    fn frame_round_trip() {
        let record = sample(RecordKind::Response);
        let mut buf = Vec::new();
        encode_frame(&record, &mut buf).unwrap();
        seal_frame(&mut buf, 7);
        let (seq, back, size) = decode_frame(&buf).unwrap();
        assert_eq!((seq, size), (7, buf.len()));
        assert_eq!(back, record);
    }

    /// A format-0 body: the fields before `reversal_stan`, untagged, as switches before
    /// record formats wrote them.
    fn format_0_frame(record: &Record) -> Vec<u8> {
        let mut body = postcard::to_allocvec(record).unwrap();
        body.truncate(body.len() - FORMAT_0_TRAILER.len());
        let mut frame = vec![0u8; FRAME_HEADER];
        frame.extend_from_slice(&body);
        let len = u32::try_from(frame.len() - 4).unwrap();
        frame[0..4].copy_from_slice(&len.to_le_bytes());
        seal_frame(&mut frame, 3);
        frame
    }

    #[test]
    fn journals_written_before_record_formats_are_read() {
        for kind in [RecordKind::Request, RecordKind::ReversalAck] {
            // The fields added since, at the defaults a format-0 journal reads them with.
            let record = Record {
                event_ms: 0,
                mcc: 0,
                country: 0,
                pos_entry_mode: 0,
                ..sample(kind)
            };
            let (seq, back, _) = decode_frame(&format_0_frame(&record)).unwrap();
            assert_eq!((seq, back), (3, record));
        }
    }

    #[test]
    fn format_1_to_3_records_are_read() {
        let record = Record {
            event_ms: 0,
            mcc: 0,
            country: 0,
            pos_entry_mode: 0,
            ..sample(RecordKind::ReversalAck)
        };
        for version in [1, 2, 3] {
            let mut buf = Vec::new();
            encode_frame(&record, &mut buf).unwrap();
            // Without the fields later formats added.
            let trailer = if version == 3 {
                FORMAT_3_TRAILER
            } else {
                FORMAT_1_TRAILER
            };
            buf.truncate(buf.len() - trailer.len());
            buf[FRAME_HEADER] = FORMAT_TAG_BASE + version;
            let len = u32::try_from(buf.len() - 4).unwrap();
            buf[0..4].copy_from_slice(&len.to_le_bytes());
            seal_frame(&mut buf, 4);
            assert_eq!(decode_frame(&buf).unwrap().1, record, "format {version}");
        }
    }

    #[test]
    fn a_sealed_pan_survives_the_frame_and_only_where_a_reversal_needs_it() {
        let vault = super::super::vault::PanVault::from_keys(&[(3, [1; 32])]).unwrap();
        let mut request = sample(RecordKind::Request);
        request.pan_sealed = Some(vault.seal(b"4111111111111111", request.pan_hash));
        let mut buf = Vec::new();
        encode_frame(&request, &mut buf).unwrap();
        seal_frame(&mut buf, 1);
        let (_, back, _) = decode_frame(&buf).unwrap();
        assert_eq!(back, request);
        assert!(!buf.windows(16).any(|w| w == b"4111111111111111"));
        let forwarded = request.follow_up(RecordKind::Forwarded, 1, 2);
        let pan = vault.open(forwarded.pan_sealed.as_ref().unwrap(), forwarded.pan_hash);
        assert_eq!(pan.unwrap().expose(), b"4111111111111111");
        let response = request.follow_up(RecordKind::Response, 1, 2);
        assert!(response.pan_sealed.is_none());
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let mut buf = Vec::new();
        encode_frame(&sample(RecordKind::Request), &mut buf).unwrap();
        buf[FRAME_HEADER] = FORMAT_TAG_BASE + RECORD_FORMAT + 1;
        seal_frame(&mut buf, 1);
        match decode_frame(&buf) {
            Err(FrameError::Body(why)) => assert!(why.contains("format 5"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_record_too_big_to_read_back_is_never_written() {
        let mut record = sample(RecordKind::Response);
        record.private_data = "x".repeat(MAX_RECORD_BODY);
        let mut buf = vec![1, 2, 3];
        assert!(encode_frame(&record, &mut buf).is_err());
        assert_eq!(buf, [1, 2, 3], "nothing half-written");
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode_frame(&sample(RecordKind::Request), &mut buf).unwrap();
        seal_frame(&mut buf, 1);
        for byte in 4..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode_frame(&bad).is_err(), "byte {byte} bit {bit}");
            }
        }
        assert_eq!(
            decode_frame(&buf[..buf.len() - 1]),
            Err(FrameError::Truncated)
        );
    }
}
