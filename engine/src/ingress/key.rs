//! What identifies a request among its retransmissions: terminal (41), STAN (11), RRN
//! (37) and transmission time (7) — the key gateways keep when they retransmit — and
//! whether it is an authorization or a reversal (a reversal may reuse its original's STAN
//! and time).

use payswitch_protocol::{fields, Message};

use crate::journal::Record;

/// What identifies one request among retransmissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DupKey {
    /// A 0400/0420.
    pub reversal: bool,
    terminal: [u8; 8],
    stan: [u8; 6],
    rrn: [u8; 12],
    transmission: [u8; 10],
}

fn fixed<const N: usize>(raw: Option<&[u8]>) -> Option<[u8; N]> {
    raw?.try_into().ok()
}

impl DupKey {
    /// The key of a request; `None` when one of its fields is missing (validation refuses
    /// such requests before they get here).
    pub fn of(request: &Message, reversal: bool) -> Option<DupKey> {
        Some(DupKey {
            reversal,
            terminal: fixed(request.get(fields::TERMINAL))?,
            stan: fixed(request.get(fields::STAN))?,
            rrn: fixed(request.get(fields::RRN))?,
            transmission: fixed(request.get(fields::TRANSMISSION_TIME))?,
        })
    }

    /// The key of the authorization a reversal names in field 90 (original MTI, STAN,
    /// transmission time, …), with the reversal's own terminal and RRN.
    pub fn original_of(reversal: &Message) -> Option<DupKey> {
        let original = reversal.get(fields::ORIGINAL_DATA)?;
        if original.len() < 20 {
            return None;
        }
        Some(DupKey {
            reversal: false,
            terminal: fixed(reversal.get(fields::TERMINAL))?,
            stan: original[4..10].try_into().ok()?,
            rrn: fixed(reversal.get(fields::RRN))?,
            transmission: original[10..20].try_into().ok()?,
        })
    }

    /// The key of the request a journal record belongs to.
    pub fn of_record(record: &Record) -> Option<DupKey> {
        let reversal = matches!(record.mti.as_str(), "0400" | "0401" | "0420" | "0421");
        Some(DupKey {
            reversal,
            terminal: record.terminal.as_bytes().try_into().ok()?,
            stan: record.stan.as_bytes().try_into().ok()?,
            rrn: record.rrn.as_bytes().try_into().ok()?,
            transmission: record.transmission_time.as_bytes().try_into().ok()?,
        })
    }

    /// The key as bytes: the kind (`R` reversal, `A` authorization), terminal, STAN,
    /// RRN and transmission time. The same on every node, so a cluster can name a
    /// request by it.
    pub fn bytes(&self) -> [u8; 37] {
        let mut out = [0u8; 37];
        out[0] = if self.reversal { b'R' } else { b'A' };
        out[1..9].copy_from_slice(&self.terminal);
        out[9..15].copy_from_slice(&self.stan);
        out[15..27].copy_from_slice(&self.rrn);
        out[27..37].copy_from_slice(&self.transmission);
        out
    }

    /// Terminal and RRN: what a reversal without field 90 finds its original by.
    pub fn terminal_rrn(&self) -> ([u8; 8], [u8; 12]) {
        (self.terminal, self.rrn)
    }
}
