//! What the switch accepts, and how it answers: pure functions over messages.

use payswitch_protocol::{
    fields, AmountMinor, CurrencyCode, Mcc, Message, Mti, Pan, ResponseCode, Rrn, Stan,
    TransmissionTime, ValueError,
};

/// What a request asks of the switch, by its MTI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 0100 authorization or 0200 financial request: validated, scored, routed.
    Authorization,
    /// 0400 reversal or 0420 reversal advice: validated and routed.
    Reversal,
    /// 0800 network management: answered by the switch itself.
    Network,
    /// Anything else: answered 12.
    Unsupported,
}

/// Classifies a request by its MTI.
pub fn classify(mti: Mti) -> Kind {
    // A gateway's repeat (0101, 0401, 0421…) is its first transmission sent again: a
    // retransmission, answered from the original like any other.
    match mti.first_transmission().as_bytes() {
        b"0100" | b"0200" => Kind::Authorization,
        b"0400" | b"0420" => Kind::Reversal,
        b"0800" => Kind::Network,
        _ => Kind::Unsupported,
    }
}

/// The fields of a 0100/0200/0400/0420 that the switch reads, parsed.
#[derive(Debug, Clone, Copy)]
pub struct Authorization {
    /// The card (Luhn-checked).
    pub pan: Pan,
    /// Amount in minor units.
    pub amount: AmountMinor,
    /// Currency of the amount.
    pub currency: CurrencyCode,
    /// The gateway's trace number.
    pub stan: Stan,
    /// Retrieval reference number.
    pub rrn: Rrn,
    /// Merchant category, when sent.
    pub mcc: Option<Mcc>,
}

fn digits(raw: &[u8], len: usize) -> bool {
    raw.len() == len && raw.iter().all(u8::is_ascii_digit)
}

/// The fields of a 0100/0200/0400/0420 that ISO 8583:1987 types numeric (`n`), beyond
/// those checked one by one below. The field table every gateway and acquirer shares
/// (`protocol/iso8583-fields.tsv`) types them all as ASCII of their length, so the codec
/// takes any character; a numeric field with anything but digits is refused with 30 here
/// rather than forwarded (an `0x1` in field 22 once reached an acquirer and was approved).
/// 5, 6, 9, 10: amounts and conversion rates; 12, 13: local time and date; 14: expiry;
/// 15–17: settlement, conversion and capture dates; 19–21: country codes; 22: POS entry
/// mode; 23: card sequence number; 24–26: network, POS condition and PIN capture codes;
/// 32, 33: institution codes; 50, 51: currencies.
const NUMERIC_FIELDS: [u8; 22] = [
    5, 6, 9, 10, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 32, 33, 50, 51,
];

/// Checks a request's required fields: 30 for a missing or malformed one, 14 for a PAN
/// that fails only the Luhn check. Format errors win over Luhn: a request with both is 30.
pub fn validate(msg: &Message) -> Result<Authorization, ResponseCode> {
    const FORMAT: ResponseCode = ResponseCode::FormatError;
    for number in fields::REQUIRED_FOR_AUTHORIZATION {
        if !msg.has(number) {
            return Err(FORMAT);
        }
    }
    let field = |n| msg.get(n).unwrap_or_default();
    let numeric = |raw: &[u8]| raw.iter().all(u8::is_ascii_digit);
    if NUMERIC_FIELDS
        .iter()
        .any(|&n| msg.get(n).is_some_and(|raw| !numeric(raw)))
    {
        return Err(FORMAT);
    }
    if !digits(field(fields::PROCESSING_CODE), 6)
        || TransmissionTime::parse(field(fields::TRANSMISSION_TIME)).is_err()
    {
        return Err(FORMAT);
    }
    let amount = AmountMinor::parse(field(fields::AMOUNT)).map_err(|_| FORMAT)?;
    let currency = CurrencyCode::parse(field(fields::CURRENCY)).map_err(|_| FORMAT)?;
    let stan = Stan::parse(field(fields::STAN)).map_err(|_| FORMAT)?;
    let rrn = Rrn::parse(field(fields::RRN)).map_err(|_| FORMAT)?;
    // 41 and 42 are fixed-length ASCII, checked by the codec; blank IDs are still useless.
    if field(fields::TERMINAL).iter().all(|b| *b == b' ')
        || field(fields::MERCHANT).iter().all(|b| *b == b' ')
    {
        return Err(FORMAT);
    }
    let mcc = match msg.get(fields::MCC) {
        Some(raw) => Some(Mcc::parse(raw).map_err(|_| FORMAT)?),
        None => None,
    };
    let pan = match Pan::parse(field(fields::PAN)) {
        Ok(pan) => pan,
        Err(ValueError::Luhn) => return Err(ResponseCode::InvalidCardNumber),
        Err(_) => return Err(FORMAT),
    };
    Ok(Authorization {
        pan,
        amount,
        currency,
        stan,
        rrn,
        mcc,
    })
}

/// Largest field 48 the switch writes; the tags are short, so this is never reached, and
/// an overlong value is cut rather than failing the response.
const MAX_PRIVATE_DATA: usize = 999;

/// Builds the response to `request`: MTI + 10, the echoed fields, 39, 38 when approved,
/// and 48 when `private_data` is not empty.
pub fn respond(
    request: &Message,
    code: &[u8; 2],
    approval_code: Option<&[u8]>,
    private_data: &str,
) -> Message {
    let mti = request.mti().response().unwrap_or(request.mti());
    let mut builder = Message::builder(mti);
    // Echoed values passed the codec's checks on the way in, so setting them cannot fail;
    // a field that is absent is skipped.
    let _ = builder.copy_from(request, &fields::ECHOED);
    if let Some(approval) = approval_code {
        let _ = builder.set(fields::APPROVAL_CODE, approval);
    }
    let _ = builder.set(fields::RESPONSE_CODE, code);
    if !private_data.is_empty() {
        let end = private_data.len().min(MAX_PRIVATE_DATA);
        let _ = builder.set(fields::PRIVATE_DATA, &private_data.as_bytes()[..end]);
    }
    builder.build()
}

/// The response code of an acquirer's answer, if it is two letters or digits.
pub fn acquirer_code(answer: &Message) -> Option<[u8; 2]> {
    let raw = answer.get(fields::RESPONSE_CODE)?;
    let code: [u8; 2] = raw.try_into().ok()?;
    code.iter().all(u8::is_ascii_alphanumeric).then_some(code)
}

/// The approval code of an acquirer's answer, if it is six letters, digits or spaces.
pub fn acquirer_approval_code(answer: &Message) -> Option<&[u8]> {
    let raw = answer.get(fields::APPROVAL_CODE)?;
    (raw.len() == 6 && raw.iter().all(|b| b.is_ascii_alphanumeric() || *b == b' ')).then_some(raw)
}

/// The answer to an 0800: 0810 with 39=00 for sign-on (001), sign-off (002) and echo
/// (301); 12 for other network codes; 30 without field 70.
pub fn respond_network(request: &Message) -> Message {
    let code = match request.get(fields::NETWORK_CODE) {
        Some(b"001" | b"002" | b"301") => ResponseCode::Approved,
        Some(_) => ResponseCode::InvalidTransaction,
        None => ResponseCode::FormatError,
    };
    let mut builder = Message::builder(Mti::NETWORK_RESPONSE);
    let _ = builder.copy_from(
        request,
        &[fields::TRANSMISSION_TIME, fields::STAN, fields::TERMINAL],
    );
    let _ = builder.set(fields::RESPONSE_CODE, code.as_str().as_bytes());
    let _ = builder.copy_from(request, &[fields::NETWORK_CODE]);
    builder.build()
}

/// A response code as its two bytes.
pub fn as_code(code: ResponseCode) -> [u8; 2] {
    let s = code.as_str().as_bytes();
    [s[0], s[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(overrides: &[(u8, Option<&str>)]) -> Message {
        let base: [(u8, &str); 11] = [
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
        let mut b = Message::builder(Mti::AUTHORIZATION_REQUEST);
        for (n, v) in base {
            match overrides.iter().find(|(o, _)| *o == n) {
                Some((_, Some(value))) => b.set_str(n, value).unwrap(),
                Some((_, None)) => continue,
                None => b.set_str(n, v).unwrap(),
            };
        }
        for (n, value) in overrides {
            if let (false, Some(value)) = (base.iter().any(|(b, _)| b == n), value) {
                b.set_str(*n, value).unwrap();
            }
        }
        b.build()
    }

    #[test]
    fn a_well_formed_request_validates() {
        let auth = validate(&request(&[])).unwrap();
        assert_eq!(auth.amount.get(), 12_500);
        assert_eq!(auth.currency.get(), 840);
        assert_eq!(auth.stan.get(), 1);
        assert_eq!(auth.mcc.map(|m| m.get()), Some(5411));
    }

    #[test]
    fn each_missing_required_field_is_a_format_error() {
        for n in fields::REQUIRED_FOR_AUTHORIZATION {
            assert_eq!(
                validate(&request(&[(n, None)])).unwrap_err(),
                ResponseCode::FormatError,
                "field {n}"
            );
        }
    }

    #[test]
    fn malformed_values_are_format_errors() {
        let cases: [(u8, &str); 11] = [
            (22, "0x1"),
            (14, "29A2"),
            (19, " 84"),
            (2, "41111111X1111111"),
            (2, "41111111111"),
            (3, "00000A"),
            (4, "00000001250A"),
            (7, "1325123045"),
            (11, "00000A"),
            (49, "84A"),
            (41, "        "),
        ];
        for (n, v) in cases {
            assert_eq!(
                validate(&request(&[(n, Some(v))])).unwrap_err(),
                ResponseCode::FormatError,
                "{n}={v}"
            );
        }
    }

    #[test]
    fn luhn_failure_is_14_but_format_wins() {
        assert_eq!(
            validate(&request(&[(2, Some("4111111111111112"))])).unwrap_err(),
            ResponseCode::InvalidCardNumber
        );
        assert_eq!(
            validate(&request(&[(2, Some("4111111111111112")), (4, None)])).unwrap_err(),
            ResponseCode::FormatError
        );
    }

    #[test]
    fn response_echoes_and_adds_39_38_48() {
        let req = request(&[]);
        let resp = respond(&req, b"00", Some(b"A1B2C3"), "decision=approve;acquirer=x");
        assert_eq!(resp.mti().as_str(), "0110");
        for n in fields::ECHOED {
            assert_eq!(resp.get(n), req.get(n), "field {n}");
        }
        assert_eq!(resp.get_str(39), Some("00"));
        assert_eq!(resp.get_str(38), Some("A1B2C3"));
        assert_eq!(resp.get_str(48), Some("decision=approve;acquirer=x"));
        assert!(!resp.has(18), "only the contract's fields are echoed");
    }

    #[test]
    fn network_codes() {
        let echo = |code: Option<&str>| {
            let mut b = Message::builder(Mti::NETWORK_REQUEST);
            b.set_str(7, "1125123045")
                .unwrap()
                .set_str(11, "000009")
                .unwrap();
            if let Some(code) = code {
                b.set_str(70, code).unwrap();
            }
            respond_network(&b.build())
        };
        for code in ["001", "002", "301"] {
            let resp = echo(Some(code));
            assert_eq!(resp.mti().as_str(), "0810");
            assert_eq!(resp.get_str(39), Some("00"));
            assert_eq!(resp.get_str(70), Some(code));
            assert_eq!(resp.get_str(11), Some("000009"));
        }
        assert_eq!(echo(Some("999")).get_str(39), Some("12"));
        assert_eq!(echo(None).get_str(39), Some("30"));
    }

    #[test]
    fn classify_mtis() {
        let kind = |s: &str| classify(Mti::parse(s.as_bytes()).unwrap());
        assert_eq!(kind("0100"), Kind::Authorization);
        assert_eq!(kind("0200"), Kind::Authorization);
        assert_eq!(kind("0420"), Kind::Reversal);
        assert_eq!(kind("0401"), Kind::Reversal);
        assert_eq!(kind("0421"), Kind::Reversal);
        assert_eq!(kind("0101"), Kind::Authorization);
        assert_eq!(kind("0800"), Kind::Network);
        assert_eq!(kind("0300"), Kind::Unsupported);
        assert_eq!(kind("0110"), Kind::Unsupported);
    }
}
