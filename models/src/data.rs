//! The labeled transaction file: CSV with a header, one transaction per row, time-ordered.
//!
//! `timestamp,pan,amount_minor,currency,mcc,merchant_id,terminal_id,country,pos_entry_mode,is_fraud,scenario`
//!
//! `timestamp` is RFC 3339 UTC (`2026-11-25T13:45:00Z`, fractional seconds allowed),
//! `currency` and `country` ISO numeric, `is_fraud` 0/1, `scenario` one word (`none` for
//! legitimate). `payswitch gen-data` writes it; `model train`, `model eval` and
//! `load --data` read any file with these columns, in this order.
//!
//! The file holds synthetic PANs in full (it is test data a generator made); `Debug` of a
//! row masks them anyway, so a row can be logged.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The header, exactly.
pub const HEADER: [&str; 11] = [
    "timestamp",
    "pan",
    "amount_minor",
    "currency",
    "mcc",
    "merchant_id",
    "terminal_id",
    "country",
    "pos_entry_mode",
    "is_fraud",
    "scenario",
];

/// One labeled transaction.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledTransaction {
    /// RFC 3339 UTC time, as in the file.
    pub timestamp: String,
    /// Card number (digits).
    pub pan: String,
    /// Amount in minor units.
    pub amount_minor: u64,
    /// ISO 4217 numeric currency.
    pub currency: u16,
    /// Merchant category code.
    pub mcc: u16,
    /// Merchant (card acceptor) ID, up to 15 characters.
    pub merchant_id: String,
    /// Terminal ID, up to 8 characters.
    pub terminal_id: String,
    /// ISO 3166 numeric country of the merchant.
    pub country: u16,
    /// POS entry mode (field 22), e.g. 051 chip, 010 e-commerce / manual.
    pub pos_entry_mode: u16,
    /// 1 when the transaction is fraud.
    pub is_fraud: u8,
    /// Fraud scenario, `none` for legitimate.
    pub scenario: String,
}

impl std::fmt::Debug for LabeledTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabeledTransaction")
            .field("timestamp", &self.timestamp)
            .field(
                "pan",
                &payswitch_protocol::types::mask_pan(self.pan.as_bytes()),
            )
            .field("amount_minor", &self.amount_minor)
            .field("mcc", &self.mcc)
            .field("merchant_id", &self.merchant_id)
            .field("is_fraud", &self.is_fraud)
            .field("scenario", &self.scenario)
            .finish()
    }
}

impl LabeledTransaction {
    /// Milliseconds since the Unix epoch, from the RFC 3339 UTC `timestamp`; `None` if it
    /// is not of the form `YYYY-MM-DDThh:mm:ss[.fff]Z`.
    pub fn timestamp_ms(&self) -> Option<i64> {
        parse_rfc3339_utc_ms(&self.timestamp)
    }
}

/// Errors reading or writing a labeled file.
#[derive(Debug, Error)]
pub enum DataError {
    /// The header is not the expected one.
    #[error("header is not `{}`", HEADER.join(","))]
    Header,
    /// A row does not parse (line numbers count the header as line 1).
    #[error("line {line}: {reason}")]
    Row {
        /// Line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads a whole labeled file, checking the header and every timestamp.
pub fn read_all<R: Read>(input: R) -> Result<Vec<LabeledTransaction>, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input);
    let header = reader.headers().map_err(|e| DataError::Row {
        line: 1,
        reason: e.to_string(),
    })?;
    if header.iter().map(str::trim).ne(HEADER.iter().copied()) {
        return Err(DataError::Header);
    }
    let mut rows = Vec::new();
    for (i, record) in reader.deserialize::<LabeledTransaction>().enumerate() {
        let line = i as u64 + 2;
        let row = record.map_err(|e| DataError::Row {
            line,
            // csv's message may quote the field; never the PAN column's value.
            reason: match e.position() {
                Some(_) => "a value does not parse".to_string(),
                None => e.to_string(),
            },
        })?;
        if row.timestamp_ms().is_none() {
            return Err(DataError::Row {
                line,
                reason: "timestamp is not RFC 3339 UTC".into(),
            });
        }
        if row.is_fraud > 1 {
            return Err(DataError::Row {
                line,
                reason: "is_fraud is not 0 or 1".into(),
            });
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Writes rows with the header.
pub fn write_all<W: Write>(output: W, rows: &[LabeledTransaction]) -> Result<(), DataError> {
    // The header is written explicitly, in the contract's order; csv must not add its own.
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(output);
    writer
        .write_record(HEADER)
        .map_err(|e| DataError::Io(e.into()))?;
    for row in rows {
        writer.serialize(row).map_err(|e| DataError::Io(e.into()))?;
    }
    writer.flush()?;
    Ok(())
}

/// `YYYY-MM-DDThh:mm:ss[.fraction]Z` to Unix milliseconds.
pub fn parse_rfc3339_utc_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let rest = &text[19..];
    let (fraction, zone) = match rest.strip_prefix('.') {
        Some(f) => {
            let digits = f.bytes().take_while(u8::is_ascii_digit).count();
            (&f[..digits], &f[digits..])
        }
        None => ("", rest),
    };
    if zone != "Z" {
        return None;
    }
    let millis = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    // Month and day are range-checked above.
    let days = payswitch_protocol::time::days_from_civil(year, month as u32, day as u32);
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "timestamp,pan,amount_minor,currency,mcc,merchant_id,terminal_id,country,pos_entry_mode,is_fraud,scenario
2026-11-25T13:45:00Z,4000001234567899,12500,840,5411,MERCHANT0000001,TERM0001,840,51,0,none
2026-11-25T13:45:01.250Z,4000001234567899,99,840,5999,MERCHANT0000002,TERM0002,840,10,1,card_testing
";

    #[test]
    fn reads_and_writes_the_format() {
        let rows = read_all(SAMPLE.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].scenario, "card_testing");
        assert_eq!(
            rows[1].timestamp_ms().unwrap() - rows[0].timestamp_ms().unwrap(),
            1_250
        );
        let mut out = Vec::new();
        write_all(&mut out, &rows).unwrap();
        assert_eq!(read_all(&out[..]).unwrap(), rows);
    }

    #[test]
    fn known_instants() {
        assert_eq!(parse_rfc3339_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc_ms("2000-03-01T00:00:00.5Z"),
            Some(951_868_800_500)
        );
        assert_eq!(parse_rfc3339_utc_ms("2026-11-25T13:45:00+01:00"), None);
        assert_eq!(parse_rfc3339_utc_ms("2026-13-25T13:45:00Z"), None);
    }

    #[test]
    fn wrong_header_and_bad_rows_are_refused_without_the_pan() {
        let bad_header = SAMPLE.replacen("timestamp,pan", "time,pan", 1);
        assert!(matches!(
            read_all(bad_header.as_bytes()),
            Err(DataError::Header)
        ));
        let bad_row = SAMPLE.replace("12500", "12x00");
        let err = read_all(bad_row.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("line 2"), "{err}");
        assert!(!err.contains("4000001234567899"), "{err}");
    }
}
