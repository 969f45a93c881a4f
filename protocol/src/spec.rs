//! The field table of the external interface: ISO 8583:1987 in the common "default" layout.
//!
//! Generated once from `iso8583-fields.tsv` (a copy of the shared contract kept beside this
//! crate); a unit test re-reads that file and checks every row, so the two cannot drift.

/// How a field's bytes are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// ASCII characters (bytes 0x00..=0x7f).
    Ascii,
    /// Raw bytes (PIN block, ICC data, MAC), shown as hex by the tooling.
    Binary,
}

/// How a field announces its length on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthPrefix {
    /// Exactly `max_len` bytes, no prefix.
    Fixed,
    /// Two ASCII decimal digits giving the byte count (LLVAR).
    LlVar,
    /// Three ASCII decimal digits giving the byte count (LLLVAR).
    LllVar,
}

impl LengthPrefix {
    /// Number of ASCII digits before the data.
    pub const fn digits(self) -> usize {
        match self {
            LengthPrefix::Fixed => 0,
            LengthPrefix::LlVar => 2,
            LengthPrefix::LllVar => 3,
        }
    }
}

/// The wire format of one data element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field number, 1..=128.
    pub number: u8,
    /// ASCII or binary.
    pub encoding: Encoding,
    /// Fixed, LLVAR or LLLVAR.
    pub prefix: LengthPrefix,
    /// Exact length for fixed fields, maximum for variable ones, in bytes.
    pub max_len: u16,
    /// The standard's name for the field.
    pub name: &'static str,
}

impl FieldSpec {
    const fn new(
        number: u8,
        encoding: Encoding,
        prefix: LengthPrefix,
        max_len: u16,
        name: &'static str,
    ) -> FieldSpec {
        FieldSpec {
            number,
            encoding,
            prefix,
            max_len,
            name,
        }
    }
}

/// Highest field number (the secondary bitmap's last bit).
pub const MAX_FIELD: u8 = 128;

/// The spec of field `number`, or `None` outside 1..=128.
pub fn field(number: u8) -> Option<&'static FieldSpec> {
    FIELDS.get(usize::from(number).wrapping_sub(1))
}

/// Every field, indexed by `number - 1`.
pub static FIELDS: [FieldSpec; 128] = [
    FieldSpec::new(
        1,
        Encoding::Binary,
        LengthPrefix::Fixed,
        8,
        "Bitmap, Secondary",
    ),
    FieldSpec::new(
        2,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        19,
        "Primary Account Number (PAN)",
    ),
    FieldSpec::new(
        3,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        6,
        "Processing Code",
    ),
    FieldSpec::new(
        4,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Amount, Transaction",
    ),
    FieldSpec::new(
        5,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Amount, Settlement",
    ),
    FieldSpec::new(
        6,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Amount, Cardholder Billing",
    ),
    FieldSpec::new(
        7,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Transmission Date and Time",
    ),
    FieldSpec::new(
        8,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        8,
        "Amount, Cardholder Billing Fee",
    ),
    FieldSpec::new(
        9,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        8,
        "Conversion Rate, Settlement",
    ),
    FieldSpec::new(
        10,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        8,
        "Conversion Rate, Cardholder Billing",
    ),
    FieldSpec::new(
        11,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        6,
        "System Trace Audit Number",
    ),
    FieldSpec::new(
        12,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        6,
        "Time, Local Transaction",
    ),
    FieldSpec::new(
        13,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Date, Local Transaction",
    ),
    FieldSpec::new(
        14,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Date, Expiration",
    ),
    FieldSpec::new(
        15,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Date, Settlement",
    ),
    FieldSpec::new(
        16,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Date, Conversion",
    ),
    FieldSpec::new(17, Encoding::Ascii, LengthPrefix::Fixed, 4, "Date, Capture"),
    FieldSpec::new(18, Encoding::Ascii, LengthPrefix::Fixed, 4, "Merchant Type"),
    FieldSpec::new(
        19,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Acquiring Institution Country Code",
    ),
    FieldSpec::new(
        20,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "PAN Country Code",
    ),
    FieldSpec::new(
        21,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Forwarding Institution Country Code",
    ),
    FieldSpec::new(
        22,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Point-of-Service Entry Mode",
    ),
    FieldSpec::new(
        23,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "PAN Sequence Number",
    ),
    FieldSpec::new(
        24,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Network International ID (NII)",
    ),
    FieldSpec::new(
        25,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        2,
        "Point-of-Service Condition Code",
    ),
    FieldSpec::new(
        26,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        2,
        "Point-of-Service Capture Code",
    ),
    FieldSpec::new(
        27,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        1,
        "Authorizing ID Response Length",
    ),
    FieldSpec::new(
        28,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        9,
        "Amount, Transaction Fee",
    ),
    FieldSpec::new(
        29,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        9,
        "Amount, Settlement Fee",
    ),
    FieldSpec::new(
        30,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        9,
        "Amount, Transaction Processing Fee",
    ),
    FieldSpec::new(
        31,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        9,
        "Amount, Settlement Processing Fee",
    ),
    FieldSpec::new(
        32,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        11,
        "Acquiring Institution ID Code",
    ),
    FieldSpec::new(
        33,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        11,
        "Forwarding Institution ID Code",
    ),
    FieldSpec::new(
        34,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        28,
        "Primary Account Number, Extended",
    ),
    FieldSpec::new(35, Encoding::Ascii, LengthPrefix::LlVar, 37, "Track 2 Data"),
    FieldSpec::new(
        36,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        104,
        "Track 3 Data",
    ),
    FieldSpec::new(
        37,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Retrieval Reference Number",
    ),
    FieldSpec::new(
        38,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        6,
        "Authorization ID Response",
    ),
    FieldSpec::new(39, Encoding::Ascii, LengthPrefix::Fixed, 2, "Response Code"),
    FieldSpec::new(
        40,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Service Restriction Code",
    ),
    FieldSpec::new(
        41,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        8,
        "Card Acceptor Terminal ID",
    ),
    FieldSpec::new(
        42,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        15,
        "Card Acceptor ID Code",
    ),
    FieldSpec::new(
        43,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        40,
        "Card Acceptor Name/Location",
    ),
    FieldSpec::new(
        44,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        25,
        "Additional Response Data",
    ),
    FieldSpec::new(45, Encoding::Ascii, LengthPrefix::LlVar, 76, "Track 1 Data"),
    FieldSpec::new(
        46,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Additional Data - ISO",
    ),
    FieldSpec::new(
        47,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Additional Data - National",
    ),
    FieldSpec::new(
        48,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Additional Data - Private",
    ),
    FieldSpec::new(
        49,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Currency Code, Transaction",
    ),
    FieldSpec::new(
        50,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Currency Code, Settlement",
    ),
    FieldSpec::new(
        51,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Currency Code, Cardholder Billing",
    ),
    FieldSpec::new(52, Encoding::Binary, LengthPrefix::Fixed, 8, "PIN"),
    FieldSpec::new(
        53,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        16,
        "Security-Related Control Information",
    ),
    FieldSpec::new(
        54,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        240,
        "Additional Amounts",
    ),
    FieldSpec::new(55, Encoding::Binary, LengthPrefix::LllVar, 255, "ICC data"),
    FieldSpec::new(
        56,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved ISO",
    ),
    FieldSpec::new(
        57,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved National",
    ),
    FieldSpec::new(
        58,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved National",
    ),
    FieldSpec::new(
        59,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved National",
    ),
    FieldSpec::new(
        60,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved National",
    ),
    FieldSpec::new(
        61,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved Private",
    ),
    FieldSpec::new(
        62,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved Private",
    ),
    FieldSpec::new(
        63,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved Private",
    ),
    FieldSpec::new(64, Encoding::Binary, LengthPrefix::Fixed, 8, "MAC"),
    FieldSpec::new(
        65,
        Encoding::Binary,
        LengthPrefix::Fixed,
        8,
        "Bitmap, Extended",
    ),
    FieldSpec::new(
        66,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        1,
        "Settlement Code",
    ),
    FieldSpec::new(
        67,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        2,
        "Extended Payment Code",
    ),
    FieldSpec::new(
        68,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Receiving Institution Country Code",
    ),
    FieldSpec::new(
        69,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Settlement Institution Country Code",
    ),
    FieldSpec::new(
        70,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        3,
        "Network Management Information Code",
    ),
    FieldSpec::new(
        71,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Message Number",
    ),
    FieldSpec::new(
        72,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        4,
        "Message Number, Last",
    ),
    FieldSpec::new(73, Encoding::Ascii, LengthPrefix::Fixed, 6, "Date, Action"),
    FieldSpec::new(
        74,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Credits, Number",
    ),
    FieldSpec::new(
        75,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Credits, Reversal Number",
    ),
    FieldSpec::new(
        76,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Debits, Number",
    ),
    FieldSpec::new(
        77,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Debits, Reversal Number",
    ),
    FieldSpec::new(
        78,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Transfer, Number",
    ),
    FieldSpec::new(
        79,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Transfer, Reversal Number",
    ),
    FieldSpec::new(
        80,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Inquiries, Number",
    ),
    FieldSpec::new(
        81,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        10,
        "Authorizations, Number",
    ),
    FieldSpec::new(
        82,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Credits, Processing Fee Amount",
    ),
    FieldSpec::new(
        83,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Credits, Transaction Fee Amount",
    ),
    FieldSpec::new(
        84,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Debits, Processing Fee Amount",
    ),
    FieldSpec::new(
        85,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        12,
        "Debits, Transaction Fee Amount",
    ),
    FieldSpec::new(
        86,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        16,
        "Credits, Amount",
    ),
    FieldSpec::new(
        87,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        16,
        "Credits, Reversal Amount",
    ),
    FieldSpec::new(
        88,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        16,
        "Debits, Amount",
    ),
    FieldSpec::new(
        89,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        16,
        "Debits, Reversal Amount",
    ),
    FieldSpec::new(
        90,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        42,
        "Original Data Elements",
    ),
    FieldSpec::new(
        91,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        1,
        "File Update Code",
    ),
    FieldSpec::new(
        92,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        2,
        "File Security Code",
    ),
    FieldSpec::new(
        93,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        5,
        "Response Indicator",
    ),
    FieldSpec::new(
        94,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        7,
        "Service Indicator",
    ),
    FieldSpec::new(
        95,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        42,
        "Replacement Amounts",
    ),
    FieldSpec::new(
        96,
        Encoding::Binary,
        LengthPrefix::Fixed,
        8,
        "Message Security Code",
    ),
    FieldSpec::new(
        97,
        Encoding::Ascii,
        LengthPrefix::Fixed,
        17,
        "Amount, Net Settlement",
    ),
    FieldSpec::new(98, Encoding::Ascii, LengthPrefix::Fixed, 25, "Payee"),
    FieldSpec::new(
        99,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        11,
        "Settlement Institution ID Code",
    ),
    FieldSpec::new(
        100,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        11,
        "Receiving Institution ID Code",
    ),
    FieldSpec::new(101, Encoding::Ascii, LengthPrefix::LlVar, 17, "File Name"),
    FieldSpec::new(
        102,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        28,
        "Account ID 1",
    ),
    FieldSpec::new(
        103,
        Encoding::Ascii,
        LengthPrefix::LlVar,
        28,
        "Account ID 2",
    ),
    FieldSpec::new(
        104,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        100,
        "Transaction Description",
    ),
    FieldSpec::new(
        105,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        106,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        107,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        108,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        109,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        110,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        111,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for ISO Use",
    ),
    FieldSpec::new(
        112,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        113,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        114,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        115,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        116,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        117,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        118,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        119,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for National Use",
    ),
    FieldSpec::new(
        120,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        121,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        122,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        123,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        124,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        125,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        126,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(
        127,
        Encoding::Ascii,
        LengthPrefix::LllVar,
        999,
        "Reserved for Private Use",
    ),
    FieldSpec::new(128, Encoding::Binary, LengthPrefix::Fixed, 8, "MAC"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_shared_tsv_row_for_row() {
        let tsv = include_str!("../iso8583-fields.tsv");
        let mut rows = 0;
        for line in tsv.lines() {
            if line.starts_with('#') || line.starts_with("field") || line.trim().is_empty() {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            if cols[0] == "t" || cols[0] == "p" {
                continue;
            }
            let number: u8 = cols[0].parse().unwrap();
            let spec = field(number).unwrap();
            assert_eq!(spec.number, number);
            let encoding = match cols[1] {
                "ascii" => Encoding::Ascii,
                "binary" => Encoding::Binary,
                other => panic!("unknown encoding {other}"),
            };
            assert_eq!(spec.encoding, encoding, "field {number}");
            assert_eq!(spec.prefix.digits().to_string(), cols[2], "field {number}");
            assert_eq!(spec.max_len.to_string(), cols[3], "field {number}");
            assert_eq!(spec.name, cols[4].trim(), "field {number}");
            rows += 1;
        }
        assert_eq!(rows, 128);
    }

    #[test]
    fn out_of_range_numbers_have_no_spec() {
        assert!(field(0).is_none());
        assert!(field(129).is_none());
        assert_eq!(field(128).unwrap().number, 128);
    }
}
