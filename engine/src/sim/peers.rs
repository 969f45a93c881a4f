//! The simulator's world outside the switch: gateways that send, retransmit and reverse,
//! and acquirers that approve, decline, slow down, fall silent and vanish, each keeping a
//! ledger of what it authorized.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, Message, Mti};
use rand::Rng;

use crate::ingress::validate;

/// Simulated time: microseconds since the simulation started.
pub type Time = u64;

/// A request's index in [`Gateways::requests`].
pub type RequestId = usize;

/// Microseconds in a millisecond and a second.
pub const MS: Time = 1_000;
/// Microseconds in a second.
pub const SECOND: Time = 1_000_000;

/// What a gateway sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// An 0100.
    Authorization,
    /// The gateway's own 0400 for one of its authorizations.
    Reversal {
        /// The authorization it reverses.
        of: RequestId,
    },
}

/// An answer a gateway received.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Field 39.
    pub code: [u8; 2],
    /// Field 48.
    pub tags: String,
}

/// One request a gateway sends (and retransmits, identical, until answered).
#[derive(Debug)]
pub struct GatewayRequest {
    /// The gateway.
    pub gateway: usize,
    /// What it is.
    pub kind: RequestKind,
    /// The frame body, as sent every time.
    pub frame: Bytes,
    /// Terminal (41) and RRN (37): what the acquirers' ledgers know it by.
    pub terminal: String,
    /// RRN (37).
    pub rrn: String,
    /// First sent.
    pub first_sent: Time,
    /// Transmissions so far.
    pub attempts: u32,
    /// Answers received (retransmissions may each get one).
    pub answers: Vec<Answer>,
    /// The gateway's reversal of this authorization, once it sent one.
    pub reversed_by: Option<RequestId>,
}

impl GatewayRequest {
    /// Whether the gateway was told it was approved.
    pub fn approved(&self) -> bool {
        self.answers.iter().any(|a| &a.code == b"00")
    }

    /// For a gateway reversal: whether the switch took it on (`reversal=queued` or
    /// `already_queued`), so the original is to be reversed.
    pub fn reversal_taken(&self) -> bool {
        self.answers
            .iter()
            .any(|a| &a.code == b"00" && a.tags.contains("queued"))
    }
}

/// Every gateway's requests.
#[derive(Debug, Default)]
pub struct Gateways {
    /// Requests in the order they were made.
    pub requests: Vec<GatewayRequest>,
    next_stan: Vec<u32>,
    next_rrn: u64,
    cards: Vec<String>,
}

/// A Luhn-valid 16-digit PAN from `body` (15 digits): the one check digit that passes
/// the protocol's own check.
fn luhn_complete(body: &str) -> String {
    (0..10)
        .map(|d| format!("{body}{d}"))
        .find(|pan| payswitch_protocol::types::luhn_valid(pan.as_bytes()))
        .expect("one of ten check digits passes")
}

/// Field 7 (MMDDhhmmss, UTC) for Unix seconds.
fn transmission_time(unix_s: i64) -> String {
    UtcDateTime::from_unix_seconds(u64::try_from(unix_s).unwrap_or(0)).transmission_time()
}

fn encode(message: &Message) -> Bytes {
    let mut framed = BytesMut::new();
    message
        .encode_framed(&mut framed)
        .expect("the simulator's messages encode");
    framed.freeze().slice(2..)
}

impl Gateways {
    /// `gateways` gateways sharing a population of `cards` cards.
    pub fn new(gateways: usize, cards: usize, rng: &mut impl Rng) -> Gateways {
        let cards = (0..cards)
            .map(|i| {
                let prefix = if i % 3 == 0 { "5" } else { "4" };
                luhn_complete(&format!("{prefix}{:014}", rng.gen_range(0..10u64.pow(14))))
            })
            .collect();
        Gateways {
            requests: Vec::new(),
            next_stan: vec![0; gateways],
            next_rrn: 0,
            cards,
        }
    }

    fn terminal(gateway: usize) -> String {
        format!("SIMT{gateway:04}")
    }

    fn stan(&mut self, gateway: usize) -> String {
        let stan = &mut self.next_stan[gateway];
        *stan = *stan % 999_999 + 1;
        format!("{stan:06}")
    }

    /// A new authorization from `gateway` at `now` (`unix_s` on the gateway's clock).
    pub fn authorization(
        &mut self,
        gateway: usize,
        now: Time,
        unix_s: i64,
        rng: &mut impl Rng,
    ) -> RequestId {
        let card = self.cards[rng.gen_range(0..self.cards.len())].clone();
        let amount: u64 = if rng.gen_bool(0.05) {
            rng.gen_range(50_001..200_000)
        } else {
            rng.gen_range(100..20_000)
        };
        self.next_rrn += 1;
        let rrn = format!("{:012}", self.next_rrn);
        let terminal = Gateways::terminal(gateway);
        let stan = self.stan(gateway);
        let mut b = Message::builder(Mti::AUTHORIZATION_REQUEST);
        let built = b
            .set_str(fields::PAN, &card)
            .and_then(|b| b.set_str(fields::PROCESSING_CODE, "000000"))
            .and_then(|b| b.set_str(fields::AMOUNT, &format!("{amount:012}")))
            .and_then(|b| b.set_str(fields::TRANSMISSION_TIME, &transmission_time(unix_s)))
            .and_then(|b| b.set_str(fields::STAN, &stan))
            .and_then(|b| b.set_str(fields::MCC, "5411"))
            .and_then(|b| b.set_str(fields::RRN, &rrn))
            .and_then(|b| b.set_str(fields::TERMINAL, &terminal))
            .and_then(|b| b.set_str(fields::MERCHANT, &format!("SIMMERCHANT{gateway:04}")))
            .and_then(|b| b.set_str(fields::CURRENCY, "840"));
        built.expect("the simulator's fields fit");
        let frame = encode(&b.build());
        self.push(
            gateway,
            RequestKind::Authorization,
            frame,
            terminal,
            rrn,
            now,
        )
    }

    /// The gateway's 0400 for its authorization `of`, at `now`.
    pub fn reversal(&mut self, of: RequestId, now: Time, unix_s: i64) -> RequestId {
        let gateway = self.requests[of].gateway;
        let original = Message::decode(self.requests[of].frame.clone())
            .expect("the simulator's own frame decodes");
        let stan = self.stan(gateway);
        let original_data = format!(
            "0100{}{}{:022}",
            original.get_str(fields::STAN).unwrap_or("000000"),
            original
                .get_str(fields::TRANSMISSION_TIME)
                .unwrap_or("0000000000"),
            0
        );
        let mut b = Message::builder(Mti::REVERSAL_REQUEST);
        let built = b
            .copy_from(
                &original,
                &[
                    fields::PAN,
                    fields::PROCESSING_CODE,
                    fields::AMOUNT,
                    fields::MCC,
                    fields::RRN,
                    fields::TERMINAL,
                    fields::MERCHANT,
                    fields::CURRENCY,
                ],
            )
            .and_then(|b| b.set_str(fields::TRANSMISSION_TIME, &transmission_time(unix_s)))
            .and_then(|b| b.set_str(fields::STAN, &stan))
            .and_then(|b| b.set_str(fields::ORIGINAL_DATA, &original_data));
        built.expect("the simulator's fields fit");
        let frame = encode(&b.build());
        let (terminal, rrn) = (
            self.requests[of].terminal.clone(),
            self.requests[of].rrn.clone(),
        );
        let id = self.push(
            gateway,
            RequestKind::Reversal { of },
            frame,
            terminal,
            rrn,
            now,
        );
        self.requests[of].reversed_by = Some(id);
        id
    }

    fn push(
        &mut self,
        gateway: usize,
        kind: RequestKind,
        frame: Bytes,
        terminal: String,
        rrn: String,
        now: Time,
    ) -> RequestId {
        self.requests.push(GatewayRequest {
            gateway,
            kind,
            frame,
            terminal,
            rrn,
            first_sent: now,
            attempts: 0,
            answers: Vec::new(),
            reversed_by: None,
        });
        self.requests.len() - 1
    }
}

/// How an acquirer behaves now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers in milliseconds.
    Normal,
    /// Answers everything this much later than normal: past the switch's timeout.
    Slow {
        /// Extra latency.
        extra: Time,
    },
    /// Takes requests and never answers.
    Silent,
    /// Gone: the connection is lost and nothing reaches it.
    Down,
}

/// One forward of a request to an acquirer, as its ledger keeps it.
#[derive(Debug, Clone, Copy)]
struct Forward {
    link_stan: u32,
    approved: bool,
    reversed: bool,
}

/// A simulated acquirer/issuer.
#[derive(Debug)]
pub struct Acquirer {
    /// Its behaviour now.
    pub mode: Mode,
    /// Forwards per request, by terminal and RRN.
    ledger: HashMap<(String, String), Vec<Forward>>,
    next_approval: u32,
    /// Reversals received that named no forward it knows.
    pub unknown_reversals: u64,
    /// Reversals and advices without the PAN (field 2), or with another card's than the
    /// authorization it saw for the same terminal and RRN.
    pub wrong_pans: u64,
    /// The PAN of each authorization it saw, by terminal and RRN.
    pans: HashMap<(String, String), String>,
    /// Reversals of a forward already reversed (repeats; answered, not applied twice).
    pub repeated_reversals: u64,
}

/// What an acquirer does with a message.
#[derive(Debug)]
pub struct Handled {
    /// Its answer.
    pub answer: Message,
    /// A request (terminal, RRN) whose approvals net of reversals changed.
    pub key: (String, String),
}

impl Acquirer {
    /// An acquirer in normal service.
    pub fn new() -> Acquirer {
        Acquirer {
            mode: Mode::Normal,
            ledger: HashMap::new(),
            next_approval: 0,
            unknown_reversals: 0,
            wrong_pans: 0,
            pans: HashMap::new(),
            repeated_reversals: 0,
        }
    }

    /// Approvals net of reversals for the request `key` (terminal, RRN).
    pub fn net_approvals(&self, key: &(String, String)) -> u32 {
        self.ledger.get(key).map_or(0, |forwards| {
            forwards
                .iter()
                .filter(|f| f.approved && !f.reversed)
                .count() as u32
        })
    }

    /// Takes a request from the switch (with the switch's link STAN in field 11) and
    /// answers it. The same forward received twice (a network duplicate) is answered the
    /// same, not authorized again: acquirers detect duplicates by STAN and time.
    pub fn handle(&mut self, request: &Message) -> Option<Handled> {
        let text = |n| request.get_str(n).unwrap_or("").to_string();
        let key = (text(fields::TERMINAL), text(fields::RRN));
        let link_stan: u32 = text(fields::STAN).parse().ok()?;
        let pan = text(fields::PAN);
        match request.mti().as_bytes() {
            b"0100" | b"0200" => {
                self.pans.insert(key.clone(), pan);
            }
            _ => {
                let known = self.pans.get(&key);
                if pan.is_empty() || known.is_some_and(|known| *known != pan) {
                    self.wrong_pans += 1;
                }
            }
        }
        match request.mti().as_bytes() {
            b"0100" | b"0200" => {
                let forwards = self.ledger.entry(key.clone()).or_default();
                let approved = match forwards.iter().find(|f| f.link_stan == link_stan) {
                    Some(seen) => seen.approved,
                    None => {
                        let amount: u64 = text(fields::AMOUNT).parse().unwrap_or(0);
                        let pan = text(fields::PAN);
                        let declined_card = pan.bytes().map(u32::from).sum::<u32>() % 40 == 0;
                        let approved = amount <= 50_000 && !declined_card;
                        forwards.push(Forward {
                            link_stan,
                            approved,
                            reversed: false,
                        });
                        approved
                    }
                };
                let code = if approved { b"00" } else { b"05" };
                self.next_approval += 1;
                let approval = format!("{:06}", self.next_approval % 1_000_000);
                let approval = approved.then_some(approval.as_bytes());
                Some(Handled {
                    answer: validate::respond(request, code, approval, ""),
                    key,
                })
            }
            // A stand-in approval's advice: booked as approved, once per link STAN (a
            // repeat, 0121, or a network duplicate is the same advice).
            b"0120" | b"0121" | b"0220" | b"0221" => {
                let forwards = self.ledger.entry(key.clone()).or_default();
                if !forwards.iter().any(|f| f.link_stan == link_stan) {
                    forwards.push(Forward {
                        link_stan,
                        approved: true,
                        reversed: false,
                    });
                }
                Some(Handled {
                    answer: validate::respond(request, b"00", None, ""),
                    key,
                })
            }
            b"0400" | b"0401" | b"0420" | b"0421" => {
                let original = text(fields::ORIGINAL_DATA);
                let named: Option<u32> = original.get(4..10).and_then(|s| s.parse().ok());
                let forward = self
                    .ledger
                    .get_mut(&key)
                    .and_then(|forwards| forwards.iter_mut().find(|f| Some(f.link_stan) == named));
                let code = match forward {
                    Some(forward) if forward.reversed => {
                        self.repeated_reversals += 1;
                        b"00"
                    }
                    Some(forward) => {
                        forward.reversed = true;
                        b"00"
                    }
                    None => {
                        self.unknown_reversals += 1;
                        b"25"
                    }
                };
                Some(Handled {
                    answer: validate::respond(request, code, None, ""),
                    key,
                })
            }
            _ => None,
        }
    }
}

impl Default for Acquirer {
    fn default() -> Self {
        Acquirer::new()
    }
}
