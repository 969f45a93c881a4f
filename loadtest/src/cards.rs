//! Synthetic cards and terminals, and the authorization requests they send.
//!
//! Everything is drawn from a seeded rng, so a seed names one workload exactly. PANs are
//! real-looking (chosen BIN, valid Luhn digit) so a switch can validate and route them;
//! they are only ever shown masked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{fields, EncodeError, Message, Mti, Pan, Stan};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Default BINs: one Visa-like, one Mastercard-like, so a switch can route by BIN between
/// two acquirers.
pub const DEFAULT_BINS: [&str; 2] = ["400000", "510000"];

/// Length of the PANs generated: what both networks issue most.
pub const PAN_LEN: usize = 16;

/// Largest card pool. A million cards take about 50 MiB and already spread a load over far
/// more cards than any per-card state a switch keeps hot; more only costs memory.
pub const MAX_CARDS: usize = 1_000_000;

/// Cards expire 1 to this many years ahead (issuers use 3 to 5 years).
const EXPIRY_YEARS_AHEAD: u32 = 4;

/// The Luhn check digit (ASCII) that completes `payload` (ASCII digits).
pub fn luhn_check_digit(payload: &[u8]) -> u8 {
    // Walking from the right, the digit next to the check digit is doubled first.
    let sum: u32 = payload
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &b)| {
            let d = u32::from(b - b'0');
            match (i % 2 == 0, d * 2) {
                (true, doubled) if doubled > 9 => doubled - 9,
                (true, doubled) => doubled,
                (false, _) => d,
            }
        })
        .sum();
    b'0' + ((10 - sum % 10) % 10) as u8
}

/// A 16-digit PAN starting with `bin`, random middle digits, valid Luhn check digit.
///
/// `bin` must be 1 to 15 ASCII digits; [`CardPool::new`] checks user-given BINs, so any other
/// value here is a bug in the caller.
pub fn pan_with_bin(bin: &str, rng: &mut impl Rng) -> String {
    assert!(
        is_bin(bin),
        "BIN must be 1 to {} digits (checked by CardPool::new)",
        PAN_LEN - 1
    );
    let mut digits = Vec::with_capacity(PAN_LEN);
    digits.extend_from_slice(bin.as_bytes());
    while digits.len() < PAN_LEN - 1 {
        digits.push(b'0' + rng.gen_range(0..10u8));
    }
    digits.push(luhn_check_digit(&digits));
    String::from_utf8(digits).expect("ASCII digits only")
}

fn is_bin(bin: &str) -> bool {
    (1..PAN_LEN).contains(&bin.len()) && bin.bytes().all(|b| b.is_ascii_digit())
}

/// One synthetic card. `Debug` shows the PAN masked.
#[derive(Debug, Clone)]
pub struct Card {
    /// The card number.
    pub pan: Pan,
    /// Expiry month as on the wire (field 14): `YYMM`.
    pub expiry: String,
}

/// A fixed set of cards over a list of BINs.
#[derive(Debug, Clone)]
pub struct CardPool {
    cards: Vec<Card>,
}

impl CardPool {
    /// `size` cards spread evenly over `bins`, expiring in the years after `now`. The same
    /// arguments give the same cards.
    pub fn new(
        size: usize,
        bins: &[impl AsRef<str>],
        seed: u64,
        now: UtcDateTime,
    ) -> anyhow::Result<CardPool> {
        ensure!(
            (1..=MAX_CARDS).contains(&size),
            "card pool size must be 1 to {MAX_CARDS}"
        );
        ensure!(!bins.is_empty(), "at least one BIN is needed");
        for bin in bins {
            let bin = bin.as_ref();
            if !is_bin(bin) {
                bail!("BIN {bin:?} is not 1 to {} digits", PAN_LEN - 1);
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let cards = (0..size)
            .map(|i| {
                let raw = pan_with_bin(bins[i % bins.len()].as_ref(), &mut rng);
                let pan = Pan::parse(raw.as_bytes()).context("generated PAN")?;
                let year = now.year() + rng.gen_range(1..=EXPIRY_YEARS_AHEAD);
                let month = rng.gen_range(1..=12u32);
                let expiry = format!("{:02}{month:02}", year % 100);
                Ok(Card { pan, expiry })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(CardPool { cards })
    }

    /// Number of cards.
    pub fn len(&self) -> usize {
        self.cards.len()
    }

    /// Whether the pool is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    /// Every card.
    pub fn cards(&self) -> &[Card] {
        &self.cards
    }

    /// A card chosen uniformly.
    pub fn pick(&self, rng: &mut impl Rng) -> &Card {
        &self.cards[rng.gen_range(0..self.cards.len())]
    }
}

/// Merchant category codes the synthetic merchants use: grocery, restaurants, fuel,
/// transit, electronics, hotels, miscellaneous retail.
pub const MCCS: [u16; 7] = [5411, 5812, 5541, 4111, 5732, 7011, 5999];

/// Synthetic terminals per synthetic merchant.
const TERMINALS_PER_MERCHANT: u32 = 4;

/// Synthetic terminal ids and merchant ids are 7-digit numbers after a fixed prefix.
const SYNTHETIC_IDS: u32 = 10_000_000;

/// A card acceptor terminal: its id (field 41), its merchant (field 42) and the merchant's
/// category (field 18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    id: String,
    merchant: String,
    mcc: String,
}

impl Terminal {
    /// A terminal from its parts: an 8-character id, a 15-character merchant id (both
    /// printable ASCII) and an MCC below 10000.
    pub fn new(id: &str, merchant: &str, mcc: u16) -> anyhow::Result<Terminal> {
        let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        ensure!(
            id.len() == 8 && printable(id),
            "terminal id must be 8 ASCII characters"
        );
        ensure!(
            merchant.len() == 15 && printable(merchant),
            "merchant id must be 15 ASCII characters"
        );
        ensure!(mcc < 10_000, "MCC must be four digits");
        Ok(Terminal {
            id: id.to_owned(),
            merchant: merchant.to_owned(),
            mcc: format!("{mcc:04}"),
        })
    }

    /// The `index`-th synthetic terminal (`index` modulo ten million): `T0000042` of
    /// merchant `MERCHANT0000010`, which has one of [`MCCS`].
    pub fn synthetic(index: u32) -> Terminal {
        let index = index % SYNTHETIC_IDS;
        let merchant = index / TERMINALS_PER_MERCHANT;
        let mcc = MCCS[merchant as usize % MCCS.len()];
        Terminal {
            id: format!("T{index:07}"),
            merchant: format!("MERCHANT{merchant:07}"),
            mcc: format!("{mcc:04}"),
        }
    }

    /// Field 41.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Field 42.
    pub fn merchant(&self) -> &str {
        &self.merchant
    }

    /// Field 18.
    pub fn mcc(&self) -> &str {
        &self.mcc
    }
}

/// A terminal's STAN sequence: 1, 2, ... 999 999, then 1 again.
#[derive(Debug, Clone, Default)]
pub struct StanCounter {
    last: u32,
}

impl StanCounter {
    /// A counter whose first STAN is 1.
    pub fn new() -> StanCounter {
        StanCounter::default()
    }

    /// The next STAN.
    pub fn next_stan(&mut self) -> Stan {
        self.last = if self.last >= Stan::MAX {
            1
        } else {
            self.last + 1
        };
        Stan::new(self.last).expect("kept within 1..=Stan::MAX")
    }
}

/// RRNs are 8 base-36 characters of a block number then 4 of a counter within the block.
const RRN_COUNTER_DIGITS: u32 = 4;
/// RRNs per block: 36^4.
const RRNS_PER_BLOCK: u64 = 36u64.pow(RRN_COUNTER_DIGITS);
/// Block numbers are 8 base-36 digits: Unix milliseconds fit until 2059.
const RRN_BLOCKS: u64 = 36u64.pow(8);

/// The last RRN block claimed in this process, so generators started in the same
/// millisecond (parallel tests, one generator per connection) never share a block.
static LAST_RRN_BLOCK: AtomicU64 = AtomicU64::new(0);

/// Claims a block number at least `now_ms` and above every block claimed before.
fn claim_rrn_block(now_ms: u64) -> u64 {
    let previous = LAST_RRN_BLOCK
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now_ms.max(last + 1))
        })
        .expect("the update closure always returns Some");
    now_ms.max(previous + 1)
}

/// Retrieval reference numbers (field 37) unique within a process and across runs.
///
/// An RRN is a block number (Unix milliseconds when the block was claimed) and a counter.
/// A generator claims a new block when its counter runs out; blocks only go up, and a run
/// would need 1.6 million RRNs per millisecond to claim blocks faster than the clock moves,
/// so a later run never reuses an earlier run's block. (Two processes started in the same
/// millisecond could; give them different hosts or start times.)
#[derive(Debug)]
pub struct RrnGenerator {
    block: u64,
    next: u64,
}

impl Default for RrnGenerator {
    fn default() -> Self {
        RrnGenerator::new()
    }
}

impl RrnGenerator {
    /// A generator starting at the current time.
    pub fn new() -> RrnGenerator {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        RrnGenerator {
            block: claim_rrn_block(now_ms),
            next: 0,
        }
    }

    /// The next RRN: 12 characters of `0-9A-Z`.
    pub fn next_rrn(&mut self) -> String {
        if self.next == RRNS_PER_BLOCK {
            self.block = claim_rrn_block(self.block + 1);
            self.next = 0;
        }
        let value = (self.block % RRN_BLOCKS) * RRNS_PER_BLOCK + self.next;
        self.next += 1;
        base36(value, 12)
    }
}

/// `value` in `width` base-36 digits (upper case), keeping the low digits.
fn base36(mut value: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// A standard normal sample (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    // gen::<f64>() is in [0, 1); 1 - u is in (0, 1], so ln never sees 0.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal sample with the given median and shape (`sigma` of the underlying normal).
pub fn log_normal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    median * (sigma * standard_normal(rng)).exp()
}

/// Median purchase amount: 40.00.
const AMOUNT_MEDIAN_MINOR: f64 = 4_000.0;
/// Spread of purchase amounts: about 1 in 300 is over 1 000.00, so per-card limits show.
const AMOUNT_SIGMA: f64 = 1.2;
/// Smallest purchase: 1.00.
const AMOUNT_MIN_MINOR: u64 = 100;
/// Largest purchase: 25 000.00.
const AMOUNT_MAX_MINOR: u64 = 2_500_000;

/// A purchase amount in minor units: log-normal around 40.00, within 1.00 to 25 000.00.
pub fn sample_amount_minor(rng: &mut impl Rng) -> u64 {
    let amount = log_normal(rng, AMOUNT_MEDIAN_MINOR, AMOUNT_SIGMA);
    (amount as u64).clamp(AMOUNT_MIN_MINOR, AMOUNT_MAX_MINOR)
}

/// A 0100 authorization request of `card` at `terminal`: fields 2, 3 (purchase), 4, 7
/// (from `now`), 11, 14, 18, 22 (chip), 37, 41, 42, 49 (USD).
///
/// Fails only for an amount over twelve digits or an RRN that is not 12 characters.
pub fn authorization(
    card: &Card,
    amount_minor: u64,
    terminal: &Terminal,
    stan: Stan,
    rrn: &str,
    now: UtcDateTime,
) -> Result<Message, EncodeError> {
    let amount = format!("{amount_minor:012}");
    Ok(Message::builder(Mti::AUTHORIZATION_REQUEST)
        .set(fields::PAN, card.pan.expose())?
        .set_str(fields::PROCESSING_CODE, "000000")?
        .set_str(fields::AMOUNT, &amount)?
        .set_str(fields::TRANSMISSION_TIME, &now.transmission_time())?
        .set(fields::STAN, &stan.to_digits())?
        .set_str(fields::EXPIRY, &card.expiry)?
        .set_str(fields::MCC, terminal.mcc())?
        .set_str(fields::POS_ENTRY_MODE, "051")?
        .set_str(fields::RRN, rrn)?
        .set_str(fields::TERMINAL, terminal.id())?
        .set_str(fields::MERCHANT, terminal.merchant())?
        .set_str(fields::CURRENCY, "840")?
        .build())
}

/// Field 19, acquiring institution country code (ISO numeric, 3 digits). The protocol's
/// `fields` names only what the switch itself reads; this is what a labeled row's country
/// goes in.
pub const ACQUIRING_COUNTRY: u8 = 19;

/// Field 42 is 15 characters and field 41 8: shorter ids from a data file are padded with
/// spaces on the right, as acquirers do.
const MERCHANT_ID_LEN: usize = 15;
const TERMINAL_ID_LEN: usize = 8;

/// One labeled row as a 0100: fields 2, 4, 49, 18, 42, 41, 19 and 22 from the row, 7 from
/// its timestamp (so a switch reading field 7 as the event time sees the data's timeline),
/// 3 purchase, 11 `stan`, 14 `expiry` (YYMM), 37 `rrn`.
///
/// Fails on a row whose values do not fit their fields (an error names no PAN).
pub fn labeled_authorization(
    row: &payswitch_models::data::LabeledTransaction,
    stan: Stan,
    rrn: &str,
    expiry: &str,
) -> anyhow::Result<Message> {
    let pan = Pan::parse(row.pan.as_bytes())
        .context("pan is not 12 to 19 digits with a valid check digit")?;
    let time_ms = row
        .timestamp_ms()
        .context("timestamp is not RFC 3339 UTC")?;
    let seconds = u64::try_from(time_ms / 1000).context("timestamp is before 1970")?;
    let when = UtcDateTime::from_unix_seconds(seconds);
    ensure!(
        row.merchant_id.len() <= MERCHANT_ID_LEN,
        "merchant_id is longer than {MERCHANT_ID_LEN}"
    );
    ensure!(
        row.terminal_id.len() <= TERMINAL_ID_LEN,
        "terminal_id is longer than {TERMINAL_ID_LEN}"
    );
    ensure!(
        row.currency < 1000 && row.country < 1000 && row.pos_entry_mode < 1000,
        "currency, country and pos_entry_mode must be 3 digits"
    );
    ensure!(row.mcc < 10_000, "mcc must be 4 digits");
    let message = Message::builder(Mti::AUTHORIZATION_REQUEST)
        .set(fields::PAN, pan.expose())?
        .set_str(fields::PROCESSING_CODE, "000000")?
        .set_str(fields::AMOUNT, &format!("{:012}", row.amount_minor))?
        .set_str(fields::TRANSMISSION_TIME, &when.transmission_time())?
        .set(fields::STAN, &stan.to_digits())?
        .set_str(fields::EXPIRY, expiry)?
        .set_str(fields::MCC, &format!("{:04}", row.mcc))?
        .set_str(ACQUIRING_COUNTRY, &format!("{:03}", row.country))?
        .set_str(
            fields::POS_ENTRY_MODE,
            &format!("{:03}", row.pos_entry_mode),
        )?
        .set_str(fields::RRN, rrn)?
        .set_str(
            fields::TERMINAL,
            &format!("{:<TERMINAL_ID_LEN$}", row.terminal_id),
        )?
        .set_str(
            fields::MERCHANT,
            &format!("{:<MERCHANT_ID_LEN$}", row.merchant_id),
        )?
        .set_str(fields::CURRENCY, &format!("{:03}", row.currency))?
        .build();
    Ok(message)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use payswitch_protocol::types::{luhn_valid, mask_pan};

    use super::*;

    fn now() -> UtcDateTime {
        UtcDateTime::from_unix_seconds(1_795_609_845) // 2026-11-25T12:30:45Z
    }

    #[test]
    fn generated_pans_pass_luhn_and_keep_their_bin() {
        let mut rng = StdRng::seed_from_u64(7);
        for bin in ["400000", "510000", "4", "222100"] {
            for _ in 0..1000 {
                let pan = pan_with_bin(bin, &mut rng);
                assert_eq!(pan.len(), PAN_LEN);
                assert!(pan.starts_with(bin));
                assert!(luhn_valid(pan.as_bytes()), "{}", mask_pan(pan.as_bytes()));
            }
        }
    }

    #[test]
    fn check_digit_matches_known_numbers() {
        assert_eq!(luhn_check_digit(b"411111111111111"), b'1');
        assert_eq!(luhn_check_digit(b"7992739871"), b'3');
    }

    #[test]
    fn pool_is_deterministic_spread_over_bins_and_unexpired() {
        let a = CardPool::new(100, &DEFAULT_BINS, 42, now()).unwrap();
        let b = CardPool::new(100, &DEFAULT_BINS, 42, now()).unwrap();
        let c = CardPool::new(100, &DEFAULT_BINS, 43, now()).unwrap();
        let pans = |p: &CardPool| p.cards().iter().map(|c| c.pan).collect::<Vec<_>>();
        assert_eq!(pans(&a), pans(&b));
        assert_ne!(pans(&a), pans(&c));
        let visa = a
            .cards()
            .iter()
            .filter(|c| c.pan.bin() == b"400000")
            .count();
        assert_eq!(visa, 50);
        for card in a.cards() {
            let yy: u32 = card.expiry[..2].parse().unwrap();
            let mm: u32 = card.expiry[2..].parse().unwrap();
            assert!((1..=12).contains(&mm));
            assert!(2000 + yy > now().year(), "expiry {} not ahead", card.expiry);
        }
    }

    #[test]
    fn pool_refuses_bad_bins_and_sizes() {
        assert!(CardPool::new(10, &["4000a0"], 1, now()).is_err());
        assert!(CardPool::new(10, &["4000000000000000"], 1, now()).is_err());
        assert!(CardPool::new(10, &[] as &[&str], 1, now()).is_err());
        assert!(CardPool::new(0, &DEFAULT_BINS, 1, now()).is_err());
    }

    #[test]
    fn stan_wraps_to_one_after_999999() {
        let mut stans = StanCounter {
            last: Stan::MAX - 1,
        };
        assert_eq!(stans.next_stan().get(), Stan::MAX);
        assert_eq!(stans.next_stan().get(), 1);
        assert_eq!(StanCounter::new().next_stan().get(), 1);
    }

    #[test]
    fn rrns_are_unique_across_generators_and_blocks() {
        let mut seen = HashSet::new();
        let mut a = RrnGenerator::new();
        let mut b = RrnGenerator::new();
        a.next = RRNS_PER_BLOCK - 5; // cross a block boundary
        for _ in 0..20 {
            for rrn in [a.next_rrn(), b.next_rrn()] {
                assert_eq!(rrn.len(), 12);
                assert!(rrn.bytes().all(|c| c.is_ascii_alphanumeric()));
                assert!(seen.insert(rrn));
            }
        }
    }

    #[test]
    fn authorization_carries_the_listed_fields() {
        let pool = CardPool::new(1, &DEFAULT_BINS, 1, now()).unwrap();
        let card = &pool.cards()[0];
        let terminal = Terminal::synthetic(42);
        let stan = Stan::new(17).unwrap();
        let msg = authorization(card, 12_500, &terminal, stan, "ABC123DEF456", now()).unwrap();
        let msg = Message::decode(msg.to_bytes()).unwrap();
        assert_eq!(msg.mti(), Mti::AUTHORIZATION_REQUEST);
        let numbers: Vec<u8> = msg.field_numbers().collect();
        assert_eq!(numbers, [2, 3, 4, 7, 11, 14, 18, 22, 37, 41, 42, 49]);
        assert_eq!(msg.get(2), Some(card.pan.expose()));
        assert_eq!(msg.get_str(4), Some("000000012500"));
        assert_eq!(msg.get_str(7), Some("1125123045"));
        assert_eq!(msg.get_str(11), Some("000017"));
        assert_eq!(msg.get_str(41), Some("T0000042"));
        assert_eq!(msg.get_str(42), Some("MERCHANT0000010"));
        assert!(authorization(card, 10u64.pow(12), &terminal, stan, "ABC", now()).is_err());
    }

    #[test]
    fn labeled_row_becomes_an_0100_with_its_own_fields() {
        let text = "timestamp,pan,amount_minor,currency,mcc,merchant_id,terminal_id,country,pos_entry_mode,is_fraud,scenario
2026-11-25T13:45:01.250Z,4000001234567899,99,826,5999,MER7,T12,826,10,1,card_testing
";
        let row = &payswitch_models::data::read_all(text.as_bytes()).unwrap()[0];
        let stan = Stan::new(9).unwrap();
        let msg = labeled_authorization(row, stan, "ABC123DEF456", "3012").unwrap();
        let msg = Message::decode(msg.to_bytes()).unwrap();
        let numbers: Vec<u8> = msg.field_numbers().collect();
        assert_eq!(numbers, [2, 3, 4, 7, 11, 14, 18, 19, 22, 37, 41, 42, 49]);
        assert_eq!(msg.get_str(4), Some("000000000099"));
        assert_eq!(msg.get_str(7), Some("1125134501"));
        assert_eq!(msg.get_str(19), Some("826"));
        assert_eq!(msg.get_str(22), Some("010"));
        assert_eq!(msg.get_str(41), Some("T12     "));
        assert_eq!(msg.get_str(42), Some("MER7           "));
        assert_eq!(msg.get_str(49), Some("826"));
        let mut bad = row.clone();
        bad.pan.replace_range(15.., "0");
        let err = labeled_authorization(&bad, stan, "ABC123DEF456", "3012").unwrap_err();
        assert!(!format!("{err:#}").contains("400000123456"), "{err:#}");
    }

    #[test]
    fn amounts_stay_in_range() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..10_000 {
            let a = sample_amount_minor(&mut rng);
            assert!((AMOUNT_MIN_MINOR..=AMOUNT_MAX_MINOR).contains(&a));
        }
    }
}
