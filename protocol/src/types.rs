//! Newtypes for the fields the switch reads. Each is parsed once from the wire bytes, so
//! the rest of the switch handles values that are known to be well formed.

use std::fmt;

use crate::error::ValueError;

pub(crate) fn check_digits(
    raw: &[u8],
    expected: &'static str,
    len: usize,
) -> Result<(), ValueError> {
    if raw.len() != len {
        return Err(ValueError::Length {
            expected,
            len: raw.len(),
        });
    }
    match raw.iter().position(|b| !b.is_ascii_digit()) {
        Some(offset) => Err(ValueError::Character { offset }),
        None => Ok(()),
    }
}

/// `value` as exactly `N` ASCII digits, zero-padded (callers keep `value` below 10^N).
fn zero_padded<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out
}

fn decimal(raw: &[u8]) -> u64 {
    raw.iter()
        .fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'))
}

/// Message type indicator: four ASCII digits (version, class, function, origin).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mti([u8; 4]);

impl Mti {
    /// 0100 authorization request.
    pub const AUTHORIZATION_REQUEST: Mti = Mti(*b"0100");
    /// 0110 authorization response.
    pub const AUTHORIZATION_RESPONSE: Mti = Mti(*b"0110");
    /// 0200 financial request.
    pub const FINANCIAL_REQUEST: Mti = Mti(*b"0200");
    /// 0210 financial response.
    pub const FINANCIAL_RESPONSE: Mti = Mti(*b"0210");
    /// 0120 authorization advice: an authorization decided without the acquirer (stand-in)
    /// that it must book.
    pub const AUTHORIZATION_ADVICE: Mti = Mti(*b"0120");
    /// 0121 authorization advice repeat.
    pub const AUTHORIZATION_ADVICE_REPEAT: Mti = Mti(*b"0121");
    /// 0130 authorization advice response.
    pub const AUTHORIZATION_ADVICE_RESPONSE: Mti = Mti(*b"0130");
    /// 0400 reversal request.
    pub const REVERSAL_REQUEST: Mti = Mti(*b"0400");
    /// 0401 reversal request repeat: the same reversal sent again, not a new one.
    pub const REVERSAL_REQUEST_REPEAT: Mti = Mti(*b"0401");
    /// 0410 reversal response.
    pub const REVERSAL_RESPONSE: Mti = Mti(*b"0410");
    /// 0420 reversal advice.
    pub const REVERSAL_ADVICE: Mti = Mti(*b"0420");
    /// 0421 reversal advice repeat.
    pub const REVERSAL_ADVICE_REPEAT: Mti = Mti(*b"0421");
    /// 0800 network management request.
    pub const NETWORK_REQUEST: Mti = Mti(*b"0800");
    /// 0810 network management response.
    pub const NETWORK_RESPONSE: Mti = Mti(*b"0810");

    /// Parses four ASCII digits.
    pub fn parse(raw: &[u8]) -> Result<Mti, ValueError> {
        check_digits(raw, "4", 4)?;
        let mut mti = [0u8; 4];
        mti.copy_from_slice(raw);
        Ok(Mti(mti))
    }

    /// The four digits.
    pub fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }

    /// The four digits as text.
    pub fn as_str(&self) -> &str {
        // Constructed from ASCII digits only.
        std::str::from_utf8(&self.0).expect("MTI holds ASCII digits")
    }

    /// Whether this is a request (function digit even: 0 request, 2 advice, 4 notification).
    pub fn is_request(&self) -> bool {
        self.0[2].is_multiple_of(2)
    }

    /// The response to this request: function digit + 1 (0100 → 0110, 0420 → 0430); a
    /// repeat is answered as its first transmission (0401 → 0410, 0421 → 0430).
    /// `None` for a message that is itself a response.
    pub fn response(&self) -> Option<Mti> {
        if !self.is_request() || self.0[2] > b'8' {
            return None;
        }
        let mut mti = self.0;
        mti[2] += 1;
        if self.is_repeat() {
            mti[3] -= 1;
        }
        Some(Mti(mti))
    }

    /// Whether this is a repeat (origin digit odd: 1 acquirer repeat, 3 issuer repeat, 5
    /// other repeat): the same message sent again, not a new one.
    pub fn is_repeat(&self) -> bool {
        !self.0[3].is_multiple_of(2)
    }

    /// The message this one repeats (0401 → 0400); itself when it is no repeat.
    pub fn first_transmission(&self) -> Mti {
        let mut mti = self.0;
        if self.is_repeat() {
            mti[3] -= 1;
        }
        Mti(mti)
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Primary account number: 12 to 19 digits with a valid Luhn check digit.
///
/// Neither `Debug` nor `Display` shows the full number: both print the masked form
/// (first 6, last 4), so a PAN cannot reach a log by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pan {
    digits: [u8; Pan::MAX_LEN],
    len: u8,
}

impl Pan {
    /// Shortest PAN issued (ISO/IEC 7812 allows 8, but card networks issue 12 and up).
    pub const MIN_LEN: usize = 12;
    /// Longest PAN (field 2's maximum).
    pub const MAX_LEN: usize = 19;

    /// Parses digits and checks length and Luhn. A wrong length or character is a format
    /// error (response 30); a bad check digit is `ValueError::Luhn` (response 14).
    pub fn parse(raw: &[u8]) -> Result<Pan, ValueError> {
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&raw.len()) {
            return Err(ValueError::Length {
                expected: "12 to 19",
                len: raw.len(),
            });
        }
        if let Some(offset) = raw.iter().position(|b| !b.is_ascii_digit()) {
            return Err(ValueError::Character { offset });
        }
        if !luhn_valid(raw) {
            return Err(ValueError::Luhn);
        }
        let mut digits = [0u8; Self::MAX_LEN];
        digits[..raw.len()].copy_from_slice(raw);
        Ok(Pan {
            digits,
            len: raw.len() as u8,
        })
    }

    /// The full number. Use only to put it on the wire or to hash it.
    pub fn expose(&self) -> &[u8] {
        &self.digits[..usize::from(self.len)]
    }

    /// The bank identification number: the first six digits.
    pub fn bin(&self) -> &[u8] {
        &self.digits[..6]
    }

    /// First 6 and last 4 digits, the middle as `*`: `411111******1111`.
    pub fn masked(&self) -> String {
        mask_pan(self.expose())
    }
}

/// Masks any digit string as first 6 + last 4; shorter strings are masked entirely.
pub fn mask_pan(raw: &[u8]) -> String {
    if raw.len() < 10 {
        return "*".repeat(raw.len());
    }
    raw.iter()
        .enumerate()
        .map(|(i, &b)| {
            if i < 6 || i >= raw.len() - 4 {
                char::from(b)
            } else {
                '*'
            }
        })
        .collect()
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({})", self.masked())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

/// System trace audit number (field 11): six digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stan(u32);

impl Stan {
    /// Largest STAN; counters wrap to 1 after it.
    pub const MAX: u32 = 999_999;

    /// Parses six digits.
    pub fn parse(raw: &[u8]) -> Result<Stan, ValueError> {
        check_digits(raw, "6", 6)?;
        Ok(Stan(decimal(raw) as u32))
    }

    /// A STAN from a number, `None` above 999 999.
    pub fn new(value: u32) -> Option<Stan> {
        (value <= Self::MAX).then_some(Stan(value))
    }

    /// The number.
    pub fn get(&self) -> u32 {
        self.0
    }

    /// The six wire digits.
    pub fn to_digits(&self) -> [u8; 6] {
        zero_padded(u64::from(self.0))
    }
}

/// Retrieval reference number (field 37): 12 alphanumeric characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rrn([u8; 12]);

impl Rrn {
    /// Parses 12 ASCII letters or digits.
    pub fn parse(raw: &[u8]) -> Result<Rrn, ValueError> {
        if raw.len() != 12 {
            return Err(ValueError::Length {
                expected: "12",
                len: raw.len(),
            });
        }
        if let Some(offset) = raw.iter().position(|b| !b.is_ascii_alphanumeric()) {
            return Err(ValueError::Character { offset });
        }
        let mut rrn = [0u8; 12];
        rrn.copy_from_slice(raw);
        Ok(Rrn(rrn))
    }

    /// The 12 characters.
    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// An amount in minor units of its currency (field 4: twelve digits). Never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AmountMinor(u64);

impl AmountMinor {
    /// Parses twelve digits.
    pub fn parse(raw: &[u8]) -> Result<AmountMinor, ValueError> {
        check_digits(raw, "12", 12)?;
        Ok(AmountMinor(decimal(raw)))
    }

    /// An amount from minor units; `None` above the 12-digit wire maximum.
    pub fn new(minor: u64) -> Option<AmountMinor> {
        (minor <= 999_999_999_999).then_some(AmountMinor(minor))
    }

    /// Minor units.
    pub fn get(&self) -> u64 {
        self.0
    }

    /// The twelve wire digits.
    pub fn to_digits(&self) -> [u8; 12] {
        zero_padded(self.0)
    }
}

/// ISO 4217 numeric currency code (field 49): three digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CurrencyCode(u16);

impl CurrencyCode {
    /// Parses three digits.
    pub fn parse(raw: &[u8]) -> Result<CurrencyCode, ValueError> {
        check_digits(raw, "3", 3)?;
        Ok(CurrencyCode(decimal(raw) as u16))
    }

    /// The numeric code.
    pub fn get(&self) -> u16 {
        self.0
    }
}

/// Merchant category code (field 18): four digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mcc(u16);

impl Mcc {
    /// Parses four digits.
    pub fn parse(raw: &[u8]) -> Result<Mcc, ValueError> {
        check_digits(raw, "4", 4)?;
        Ok(Mcc(decimal(raw) as u16))
    }

    /// The numeric code.
    pub fn get(&self) -> u16 {
        self.0
    }
}

/// The response codes the switch uses (field 39).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResponseCode {
    /// 00 approved.
    Approved,
    /// 05 do not honor.
    DoNotHonor,
    /// 12 invalid transaction (unsupported MTI).
    InvalidTransaction,
    /// 14 invalid card number (Luhn).
    InvalidCardNumber,
    /// 25 unable to locate the original (a reversal of something the switch never saw).
    UnableToLocateOriginal,
    /// 30 format error (missing or malformed field).
    FormatError,
    /// 51 insufficient funds.
    InsufficientFunds,
    /// 54 expired card.
    ExpiredCard,
    /// 59 suspected fraud.
    SuspectedFraud,
    /// 91 issuer or switch inoperative (acquirer down, timeout, overload).
    IssuerInoperative,
    /// 92 no route.
    NoRoute,
    /// 94 duplicate transmission.
    DuplicateTransmission,
    /// 96 system malfunction.
    SystemMalfunction,
}

impl ResponseCode {
    /// Every code, for reports and tests.
    pub const ALL: [ResponseCode; 13] = [
        ResponseCode::Approved,
        ResponseCode::DoNotHonor,
        ResponseCode::InvalidTransaction,
        ResponseCode::InvalidCardNumber,
        ResponseCode::UnableToLocateOriginal,
        ResponseCode::FormatError,
        ResponseCode::InsufficientFunds,
        ResponseCode::ExpiredCard,
        ResponseCode::SuspectedFraud,
        ResponseCode::IssuerInoperative,
        ResponseCode::NoRoute,
        ResponseCode::DuplicateTransmission,
        ResponseCode::SystemMalfunction,
    ];

    /// The two wire characters.
    pub fn as_str(&self) -> &'static str {
        match self {
            ResponseCode::Approved => "00",
            ResponseCode::DoNotHonor => "05",
            ResponseCode::InvalidTransaction => "12",
            ResponseCode::InvalidCardNumber => "14",
            ResponseCode::UnableToLocateOriginal => "25",
            ResponseCode::FormatError => "30",
            ResponseCode::InsufficientFunds => "51",
            ResponseCode::ExpiredCard => "54",
            ResponseCode::SuspectedFraud => "59",
            ResponseCode::IssuerInoperative => "91",
            ResponseCode::NoRoute => "92",
            ResponseCode::DuplicateTransmission => "94",
            ResponseCode::SystemMalfunction => "96",
        }
    }

    /// Parses the two wire characters; `None` for a code the switch does not use.
    pub fn parse(raw: &[u8]) -> Option<ResponseCode> {
        ResponseCode::ALL
            .into_iter()
            .find(|code| code.as_str().as_bytes() == raw)
    }

    /// Whether the transaction was approved.
    pub fn is_approved(&self) -> bool {
        *self == ResponseCode::Approved
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_test_cards_and_rejects_a_changed_digit() {
        for pan in [
            "4111111111111111",
            "5500000000000004",
            "340000000000009",
            "6011000000000004",
        ] {
            assert!(Pan::parse(pan.as_bytes()).is_ok(), "{pan}");
        }
        assert_eq!(Pan::parse(b"4111111111111112"), Err(ValueError::Luhn));
    }

    #[test]
    fn pan_format_errors_are_not_luhn_errors() {
        assert!(matches!(
            Pan::parse(b"41111111111"),
            Err(ValueError::Length { len: 11, .. })
        ));
        assert!(matches!(
            Pan::parse(b"41111111111111111111"),
            Err(ValueError::Length { .. })
        ));
        assert_eq!(
            Pan::parse(b"41111111X1111111"),
            Err(ValueError::Character { offset: 8 })
        );
    }

    #[test]
    fn pan_never_prints_in_full() {
        let pan = Pan::parse(b"4111111111111111").unwrap();
        assert_eq!(pan.masked(), "411111******1111");
        assert_eq!(format!("{pan}"), "411111******1111");
        assert_eq!(format!("{pan:?}"), "Pan(411111******1111)");
        assert_eq!(pan.bin(), b"411111");
    }

    #[test]
    fn mti_response_adds_ten() {
        let cases = [
            ("0100", Some("0110")),
            ("0200", Some("0210")),
            ("0400", Some("0410")),
            ("0420", Some("0430")),
            ("0401", Some("0410")),
            ("0421", Some("0430")),
            ("0101", Some("0110")),
            ("0800", Some("0810")),
            ("0110", None),
        ];
        for (req, resp) in cases {
            let mti = Mti::parse(req.as_bytes()).unwrap();
            assert_eq!(mti.response().as_ref().map(Mti::as_str), resp, "{req}");
        }
        assert!(Mti::parse(b"01A0").is_err());
    }

    #[test]
    fn numeric_fields_parse_and_print() {
        assert_eq!(AmountMinor::parse(b"000000012500").unwrap().get(), 12_500);
        assert_eq!(
            &AmountMinor::new(12_500).unwrap().to_digits(),
            b"000000012500"
        );
        assert!(AmountMinor::new(1_000_000_000_000).is_none());
        assert_eq!(Stan::parse(b"000042").unwrap().get(), 42);
        assert_eq!(&Stan::new(42).unwrap().to_digits(), b"000042");
        assert!(Stan::parse(b"00042").is_err());
        assert_eq!(CurrencyCode::parse(b"840").unwrap().get(), 840);
        assert_eq!(Mcc::parse(b"5411").unwrap().get(), 5411);
        assert!(Rrn::parse(b"533012000001").is_ok());
        assert!(Rrn::parse(b"53301200000-").is_err());
    }

    #[test]
    fn response_codes_round_trip() {
        for code in ResponseCode::ALL {
            assert_eq!(ResponseCode::parse(code.as_str().as_bytes()), Some(code));
        }
        assert_eq!(ResponseCode::parse(b"99"), None);
    }
}
