//! The feature extractor, shared by training and serving: train/serve parity by
//! construction. Sans-IO: time comes in on the transaction.
//!
//! [`extract`] computes the features of a transaction from the velocity state *before* it,
//! then records the transaction into that state. Velocity state and its memory bound are
//! described in [`crate::velocity`]: exact windows over a ring of the last 32 events per
//! card (about 0.8 KiB per card) and 64 per merchant or terminal, with clock eviction at a
//! fixed number of cards and entities.
//!
//! Card, merchant and terminal are keyed by [`entity_hash`] of their identifiers, so no PAN
//! is kept in velocity state or in a model file.

use crate::data::LabeledTransaction;
use crate::velocity::{CardEvent, ClockTable, EntityEvent};
pub use crate::velocity::{CardState, EntityState};

/// Version of the feature list below; a model file names it and is refused if it differs.
pub const SCHEMA_VERSION: u32 = 1;

/// Number of features.
pub const FEATURE_COUNT: usize = 23;

/// Feature names, in order; `amount_log` and friends are `ln(1 + x)`.
pub static FEATURE_NAMES: [&str; FEATURE_COUNT] = [
    "amount_log",
    "currency_foreign",
    "country_foreign",
    "card_new",
    "mcc_risk",
    "card_not_present",
    "hour_of_day",
    "card_count_1m",
    "card_amount_1m_log",
    "card_count_1h",
    "card_amount_1h_log",
    "card_count_24h",
    "card_amount_24h_log",
    "card_secs_since_last_log",
    "card_distinct_merchants_24h",
    "card_distinct_countries_24h",
    "amount_vs_card_mean_log",
    "merchant_count_1m",
    "merchant_count_1h",
    "merchant_distinct_cards_1h",
    "terminal_count_1m",
    "terminal_count_1h",
    "terminal_distinct_cards_1h",
];

/// A feature vector.
pub type Features = [f32; FEATURE_COUNT];

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// "Never seen before" time since last: 30 days, longer than any window, so a new card looks
/// like a card long dormant rather than like one used a moment ago.
const NO_HISTORY_SECS: f32 = 30.0 * 86_400.0;

/// Default bound on cards held: 1 M cards ≈ 0.8 GiB (see the module doc).
pub const DEFAULT_MAX_CARDS: usize = 1_000_000;

/// Default bound on merchants or terminals held: 100 k ≈ 100 MiB each.
pub const DEFAULT_MAX_ENTITIES: usize = 100_000;

/// One transaction as the extractor sees it: identifiers already hashed.
#[derive(Clone, Copy, Debug)]
pub struct Transaction {
    /// Unix ms.
    pub timestamp_ms: i64,
    /// [`entity_hash`] of the PAN digits.
    pub card: u64,
    /// Amount in minor units.
    pub amount_minor: u64,
    /// ISO 4217 numeric.
    pub currency: u16,
    /// Merchant category code.
    pub mcc: u16,
    /// [`entity_hash`] of the merchant id.
    pub merchant: u64,
    /// [`entity_hash`] of the terminal id.
    pub terminal: u64,
    /// ISO 3166 numeric country of the merchant.
    pub country: u16,
    /// POS entry mode (field 22), e.g. 51 chip, 10 e-commerce.
    pub pos_entry_mode: u16,
}

impl Transaction {
    /// From a labeled row; `None` when its timestamp does not parse.
    pub fn from_labeled(row: &LabeledTransaction) -> Option<Transaction> {
        Some(Transaction {
            timestamp_ms: row.timestamp_ms()?,
            card: entity_hash(row.pan.trim().as_bytes()),
            amount_minor: row.amount_minor,
            currency: row.currency,
            mcc: row.mcc,
            merchant: entity_hash(row.merchant_id.trim().as_bytes()),
            terminal: entity_hash(row.terminal_id.trim().as_bytes()),
            country: row.country,
            pos_entry_mode: row.pos_entry_mode,
        })
    }
}

/// The switch's card key for the velocity state: the journal's keyed PAN hash folded to
/// 64 bits, so a restart can rebuild a card's history from the journal, which holds the
/// hash and never the number. Training keys cards by [`entity_hash`] of the PAN; the key
/// only tells cards apart, no feature reads its value.
pub fn card_key(pan_hash: u128) -> u64 {
    (pan_hash as u64) ^ ((pan_hash >> 64) as u64)
}

/// FNV-1a 64: stable across runs, versions and machines, which a model's features need.
/// Not collision-resistant against an adversary; a collision only merges two histories.
pub fn entity_hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Risk of a merchant category, from a fixed table of the categories card fraud favours.
pub fn mcc_risk(mcc: u16) -> f32 {
    match mcc {
        // Quasi-cash, money orders, wires, gambling, crypto-like: cash out fast.
        4829 | 6051 | 6211 | 6538 | 6540 | 7995 | 7800 | 7801 | 7802 => 1.0,
        // Electronics, jewellery, digital goods, gift cards: resold easily.
        5732 | 5944 | 5816 | 5815 | 5818 | 5734 | 5045 | 5999 => 0.7,
        // Airlines and travel agencies: high value, card not present.
        3000..=3350 | 4511 | 4722 => 0.5,
        _ => 0.0,
    }
}

/// 1 for card not present (manual key entry, e-commerce, credential on file), 0.5 for
/// magnetic stripe (easily cloned), 0 for chip and contactless.
pub fn card_not_present(pos_entry_mode: u16) -> f32 {
    // Field 22's first two digits are the PAN entry mode: a 3-digit value here.
    match pos_entry_mode / 10 {
        0 | 1 | 10 | 81 => 1.0,
        2 | 80 | 90 => 0.5,
        _ => 0.0,
    }
}

/// Cards' velocity state, bounded to `max_cards` with clock eviction.
#[derive(Debug)]
pub struct CardVelocity {
    table: ClockTable<CardState>,
}

impl CardVelocity {
    /// State for at most `max_cards` cards.
    pub fn new(max_cards: usize) -> Self {
        CardVelocity {
            table: ClockTable::new(max_cards),
        }
    }

    /// Cards held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no card is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// A card's state, if held.
    pub fn get(&self, card: u64) -> Option<&CardState> {
        self.table.peek(card)
    }
}

/// Merchants' or terminals' velocity state, bounded to `max_entities` with clock eviction.
#[derive(Debug)]
pub struct EntityVelocity {
    table: ClockTable<EntityState>,
}

impl EntityVelocity {
    /// State for at most `max_entities` merchants or terminals.
    pub fn new(max_entities: usize) -> Self {
        EntityVelocity {
            table: ClockTable::new(max_entities),
        }
    }

    /// Entities held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no entity is held.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// Features of `tx` from the state *before* it, then records `tx` into the state.
pub fn extract(
    tx: &Transaction,
    cards: &mut CardVelocity,
    merchants: &mut EntityVelocity,
    terminals: &mut EntityVelocity,
    out: &mut Features,
) {
    message_features(tx, out);
    let card = cards.table.get_or_insert(tx.card);
    card_features(tx, card, out);
    record_card(tx, card);
    let merchant = merchants.table.get_or_insert(tx.merchant);
    let [m1, mh, mc] = entity_features(tx, merchant);
    out[17..20].copy_from_slice(&[m1, mh, mc]);
    let terminal = terminals.table.get_or_insert(tx.terminal);
    let [t1, th, tc] = entity_features(tx, terminal);
    out[20..23].copy_from_slice(&[t1, th, tc]);
}

fn ln1p(x: f64) -> f32 {
    x.ln_1p() as f32
}

fn message_features(tx: &Transaction, out: &mut Features) {
    out[0] = ln1p(tx.amount_minor as f64);
    out[4] = mcc_risk(tx.mcc);
    out[5] = card_not_present(tx.pos_entry_mode);
    out[6] = (tx.timestamp_ms.rem_euclid(DAY_MS) / HOUR_MS) as f32;
}

fn card_features(tx: &Transaction, card: &CardState, out: &mut Features) {
    let now = tx.timestamp_ms;
    let new = card.seen == 0;
    out[1] = f32::from(!new && tx.currency != card.home_currency);
    out[2] = f32::from(!new && tx.country != card.home_country);
    out[3] = f32::from(new);
    let mut counts = [0u32; 3];
    let mut sums = [0u64; 3];
    let mut merchants = [0u32; crate::velocity::CARD_EVENTS];
    let mut countries = [0u32; crate::velocity::CARD_EVENTS];
    let mut in_day = 0;
    let mut nearest_ms: Option<u64> = None;
    for e in card.events.iter_newest_first() {
        let apart_ms = now.abs_diff(e.time_ms);
        nearest_ms = Some(nearest_ms.map_or(apart_ms, |n| n.min(apart_ms)));
        for (w, window) in [MINUTE_MS, HOUR_MS, DAY_MS].into_iter().enumerate() {
            if within(apart_ms, window) {
                counts[w] += 1;
                sums[w] = sums[w].saturating_add(e.amount_minor);
            }
        }
        if within(apart_ms, DAY_MS) {
            merchants[in_day] = e.merchant;
            countries[in_day] = u32::from(e.country);
            in_day += 1;
        }
    }
    for w in 0..3 {
        out[7 + 2 * w] = counts[w] as f32;
        out[8 + 2 * w] = ln1p(sums[w] as f64);
    }
    out[13] = nearest_ms.map_or(NO_HISTORY_SECS.ln_1p(), |ms| ln1p(ms as f64 / 1000.0));
    out[14] = distinct(&mut merchants[..in_day]) as f32;
    out[15] = distinct(&mut countries[..in_day]) as f32;
    out[16] = if new {
        0.0
    } else {
        ln1p(tx.amount_minor as f64) - ln1p(f64::from(card.mean_amount_minor))
    };
}

/// Whether an event `apart_ms` from the transaction falls in its `window_ms`, on either
/// side. Requests from several gateways interleave, so a ring holds events in arrival
/// order, not time order: a transaction may arrive after one stamped later than itself, or
/// carry a time far older than the card's recent events. Counting by distance in time
/// keeps both right: two transactions a second apart see each other once, whichever
/// arrives first, and an old one neither sees nor joins the card's recent windows. Data in
/// time order, as training reads it, has every event at or before the transaction, where
/// this is the usual `now - time < window`.
fn within(apart_ms: u64, window_ms: i64) -> bool {
    apart_ms < window_ms.unsigned_abs()
}

/// Distinct values in a small slice (sorts it in place; no allocation).
fn distinct(values: &mut [u32]) -> usize {
    values.sort_unstable();
    values
        .iter()
        .enumerate()
        .filter(|&(i, v)| i == 0 || values[i - 1] != *v)
        .count()
}

fn record_card(tx: &Transaction, card: &mut CardState) {
    if card.seen == 0 {
        card.home_country = tx.country;
        card.home_currency = tx.currency;
    }
    card.seen = card.seen.saturating_add(1);
    // Running mean; f32 is plenty for a ratio feature and keeps the state small.
    card.mean_amount_minor += (tx.amount_minor as f32 - card.mean_amount_minor) / card.seen as f32;
    card.events.push(CardEvent {
        time_ms: tx.timestamp_ms,
        amount_minor: tx.amount_minor,
        merchant: tx.merchant as u32,
        country: tx.country,
    });
}

/// `[count_1m, count_1h, distinct_cards_1h]` before `tx`, then records `tx`.
fn entity_features(tx: &Transaction, entity: &mut EntityState) -> [f32; 3] {
    let now = tx.timestamp_ms;
    let mut cards = [0u32; crate::velocity::ENTITY_EVENTS];
    let (mut count_1m, mut count_1h) = (0u32, 0usize);
    for e in entity.events.iter_newest_first() {
        let apart_ms = now.abs_diff(e.time_ms);
        count_1m += u32::from(within(apart_ms, MINUTE_MS));
        if within(apart_ms, HOUR_MS) {
            cards[count_1h] = e.card;
            count_1h += 1;
        }
    }
    let distinct_cards = distinct(&mut cards[..count_1h]);
    entity.events.push(EntityEvent {
        time_ms: now,
        card: tx.card as u32,
    });
    [count_1m as f32, count_1h as f32, distinct_cards as f32]
}

/// Single-threaded extractor for training and evaluation (the switch keeps one per shard).
#[derive(Debug)]
pub struct FeatureExtractor {
    /// Cards' state.
    pub cards: CardVelocity,
    /// Merchants' state.
    pub merchants: EntityVelocity,
    /// Terminals' state.
    pub terminals: EntityVelocity,
}

impl Default for FeatureExtractor {
    fn default() -> Self {
        FeatureExtractor::new(DEFAULT_MAX_CARDS, DEFAULT_MAX_ENTITIES)
    }
}

impl FeatureExtractor {
    /// Bounded to `max_cards` cards and `max_entities` merchants and as many terminals.
    pub fn new(max_cards: usize, max_entities: usize) -> Self {
        FeatureExtractor {
            cards: CardVelocity::new(max_cards),
            merchants: EntityVelocity::new(max_entities),
            terminals: EntityVelocity::new(max_entities),
        }
    }

    /// See [`extract`].
    pub fn extract(&mut self, tx: &Transaction, out: &mut Features) {
        extract(
            tx,
            &mut self.cards,
            &mut self.merchants,
            &mut self.terminals,
            out,
        );
    }
}

/// Index of a feature by name.
pub fn feature_index(name: &str) -> Option<usize> {
    FEATURE_NAMES.iter().position(|&n| n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(t_ms: i64, card: u64, amount: u64) -> Transaction {
        Transaction {
            timestamp_ms: t_ms,
            card,
            amount_minor: amount,
            currency: 978,
            mcc: 5411,
            merchant: 7,
            terminal: 8,
            country: 276,
            pos_entry_mode: 51,
        }
    }

    fn f(x: &Features, name: &str) -> f32 {
        x[feature_index(name).unwrap()]
    }

    #[test]
    fn one_minute_window_rolls_off_exactly_at_the_boundary() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        let t0 = 1_000_000_000;
        ex.extract(&tx(t0, 1, 100), &mut out);
        ex.extract(&tx(t0 + MINUTE_MS - 1, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1m"), 1.0);
        assert_eq!(f(&out, "merchant_count_1m"), 1.0);
        ex.extract(&tx(t0 + MINUTE_MS, 1, 100), &mut out);
        // The first is exactly one minute old: out of the minute, in the hour.
        assert_eq!(f(&out, "card_count_1m"), 1.0);
        assert_eq!(f(&out, "card_count_1h"), 2.0);
        assert_eq!(f(&out, "card_amount_1h_log"), (200f64).ln_1p() as f32);
        assert_eq!(f(&out, "terminal_count_1h"), 2.0);
    }

    #[test]
    fn hour_and_day_windows_roll_off_exactly() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        ex.extract(&tx(0, 1, 100), &mut out);
        ex.extract(&tx(HOUR_MS - 1, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1h"), 1.0);
        ex.extract(&tx(DAY_MS - 1, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1h"), 0.0);
        assert_eq!(f(&out, "card_count_24h"), 2.0);
        ex.extract(&tx(DAY_MS, 1, 100), &mut out);
        assert_eq!(
            f(&out, "card_count_24h"),
            2.0,
            "the first rolled off at 24 h"
        );
    }

    #[test]
    fn time_since_last_and_new_card() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        ex.extract(&tx(5_000, 1, 100), &mut out);
        assert_eq!(f(&out, "card_new"), 1.0);
        assert_eq!(f(&out, "card_secs_since_last_log"), NO_HISTORY_SECS.ln_1p());
        ex.extract(&tx(95_000, 1, 100), &mut out);
        assert_eq!(f(&out, "card_new"), 0.0);
        assert_eq!(f(&out, "card_secs_since_last_log"), 90f32.ln_1p());
    }

    #[test]
    fn home_country_is_learned_from_the_first_transaction() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        ex.extract(&tx(0, 1, 100), &mut out);
        assert_eq!(f(&out, "country_foreign"), 0.0);
        let mut abroad = tx(1_000, 1, 100);
        abroad.country = 840;
        abroad.currency = 840;
        abroad.merchant = 9;
        ex.extract(&abroad, &mut out);
        assert_eq!(f(&out, "country_foreign"), 1.0);
        assert_eq!(f(&out, "currency_foreign"), 1.0);
        ex.extract(&tx(2_000, 1, 100), &mut out);
        assert_eq!(f(&out, "country_foreign"), 0.0);
        assert_eq!(f(&out, "card_distinct_countries_24h"), 2.0);
        assert_eq!(f(&out, "card_distinct_merchants_24h"), 2.0);
    }

    #[test]
    fn cards_are_evicted_at_capacity() {
        let mut ex = FeatureExtractor::new(2, 2);
        let mut out = [0.0; FEATURE_COUNT];
        for card in 1..=5 {
            ex.extract(&tx(card as i64, card, 100), &mut out);
            assert!(ex.cards.len() <= 2);
        }
        assert_eq!(ex.cards.len(), 2);
        assert!(ex.cards.get(1).is_none());
        // An evicted card starts over as new.
        ex.extract(&tx(10, 1, 100), &mut out);
        assert_eq!(f(&out, "card_new"), 1.0);
    }

    #[test]
    fn amount_vs_mean_and_hour() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        ex.extract(&tx(13 * HOUR_MS + 5, 1, 100), &mut out);
        assert_eq!(f(&out, "hour_of_day"), 13.0);
        ex.extract(&tx(13 * HOUR_MS + 6, 1, 100_000), &mut out);
        assert!(f(&out, "amount_vs_card_mean_log") > 6.0);
    }

    #[test]
    fn interleaved_gateways_count_each_pair_once_whichever_arrives_first() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        let t0 = 1_000_000_000;
        // Stamped 10 s and 9 s: the later one arrives first.
        ex.extract(&tx(t0 + 10_000, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1m"), 0.0);
        ex.extract(&tx(t0 + 9_000, 1, 200), &mut out);
        assert_eq!(f(&out, "card_count_1m"), 1.0, "sees the one a second later");
        assert_eq!(f(&out, "card_amount_1m_log"), (100f64).ln_1p() as f32);
        assert_eq!(f(&out, "card_secs_since_last_log"), 1f32.ln_1p());
        assert_eq!(f(&out, "merchant_count_1m"), 1.0);
        assert_eq!(f(&out, "terminal_distinct_cards_1h"), 1.0);
        // 70 s on: both are more than a minute before it, and still in the hour.
        ex.extract(&tx(t0 + 79_000, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1m"), 0.0);
        assert_eq!(f(&out, "card_count_1h"), 2.0);
        assert_eq!(f(&out, "card_secs_since_last_log"), 69f32.ln_1p());
    }

    #[test]
    fn a_much_older_timestamp_neither_sees_nor_joins_recent_windows() {
        let mut ex = FeatureExtractor::new(10, 10);
        let mut out = [0.0; FEATURE_COUNT];
        let now = 10 * DAY_MS;
        ex.extract(&tx(now, 1, 100), &mut out);
        ex.extract(&tx(now + 1_000, 1, 100), &mut out);
        // A transaction stamped two days earlier arrives last.
        ex.extract(&tx(now - 2 * DAY_MS, 1, 5_000), &mut out);
        for window in ["card_count_1m", "card_count_1h", "card_count_24h"] {
            assert_eq!(f(&out, window), 0.0, "{window}");
        }
        assert_eq!(f(&out, "card_distinct_merchants_24h"), 0.0);
        assert_eq!(f(&out, "merchant_count_1h"), 0.0);
        assert_eq!(
            f(&out, "card_secs_since_last_log"),
            (2.0 * 86_400f32).ln_1p()
        );
        // The next one, back on the recent timeline, sees the recent two and not the old one.
        ex.extract(&tx(now + 2_000, 1, 100), &mut out);
        assert_eq!(f(&out, "card_count_1m"), 2.0);
        assert_eq!(f(&out, "card_count_24h"), 2.0);
        assert_eq!(f(&out, "card_amount_24h_log"), (200f64).ln_1p() as f32);
        assert_eq!(f(&out, "merchant_count_1m"), 2.0);
        assert_eq!(f(&out, "card_secs_since_last_log"), 1f32.ln_1p());
    }

    #[test]
    fn entity_hash_is_fnv1a() {
        assert_eq!(entity_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(entity_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
