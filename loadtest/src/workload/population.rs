//! The population of a workload: cards with habits, merchants, terminals; and legitimate
//! traffic drawn from the habits.

use std::collections::HashMap;

use payswitch_models::data::LabeledTransaction;
use rand::Rng;

use super::{pick, rfc3339_ms, Event, EventRow};
use crate::cards::{log_normal, luhn_check_digit, PAN_LEN};

/// Countries: ISO numeric country, ISO numeric currency, share of card homes (per cent),
/// local time offset from UTC in hours. The last three are home to no card: they are where
/// taken-over accounts get spent.
pub const COUNTRIES: [(u16, u16, u32, i64); 7] = [
    (840, 840, 80, -5), // United States, USD
    (826, 826, 10, 0),  // United Kingdom, GBP
    (276, 978, 5, 1),   // Germany, EUR
    (250, 978, 5, 1),   // France, EUR
    (566, 566, 0, 1),   // Nigeria, NGN
    (643, 643, 0, 3),   // Russia, RUB
    (76, 986, 0, -3),   // Brazil, BRL
];
/// Countries cards live in (the first ones of [`COUNTRIES`]).
const HOME_COUNTRIES: usize = 4;

/// BINs of the cards: two Visa-like, two Mastercard-like, including the load tool's
/// defaults, all inside the example config's routes.
const BINS: [&str; 4] = ["400000", "510000", "453200", "540000"];

/// Everyday MCCs and their share of purchases (per cent): grocery, restaurants, fast food,
/// fuel, transit, department stores, drugstores, misc retail, electronics, hotels.
const EVERYDAY_MCCS: [(u16, u32); 10] = [
    (5411, 25),
    (5812, 14),
    (5814, 14),
    (5541, 12),
    (4111, 8),
    (5311, 8),
    (5912, 7),
    (5999, 6),
    (5732, 4),
    (7011, 2),
];
/// High-risk MCCs, what stolen cards are spent on: electronics, jewelry, money transfer,
/// quasi-cash.
pub(crate) const HIGH_RISK_MCCS: [u16; 4] = [5732, 5944, 4829, 6051];

/// Purchases per card per day on average: typical of an active credit card.
const PURCHASES_PER_CARD_DAY: f64 = 1.5;
/// Purchases per card over the whole data set: enough history per card for velocity
/// features, few enough that the population is large.
const PURCHASES_PER_CARD: u64 = 40;
/// Fewest cards: below this, fraud bursts keep hitting the same cards.
const MIN_CARDS: u64 = 500;
/// Most cards: 250 000 cards take about 10 MiB and already look like a large issuer's
/// hot set to a switch.
const MAX_CARDS: u64 = 250_000;
/// Cards per merchant.
const CARDS_PER_MERCHANT: u64 = 20;
/// Fewest merchants beyond the one per (country, MCC, channel) that every data set has.
const MIN_MERCHANTS: u64 = 200;
/// Most terminals per physical merchant (e-commerce merchants have one "terminal").
const MAX_TERMINALS_PER_MERCHANT: u32 = 4;
/// Longest time span: a year is more history than any velocity window uses.
const MAX_SPAN_DAYS: u64 = 365;
/// Share of legitimate purchases made abroad (travel), per mille.
const TRAVEL_PER_MILLE: u32 = 20;
/// Share of legitimate purchases outside a card's usual MCCs, per mille.
const UNUSUAL_MCC_PER_MILLE: u32 = 150;
/// Share of new merchants selling online, per mille.
const ECOMMERCE_MERCHANT_PER_MILLE: u32 = 150;
/// Spread of a card's amounts around its typical amount (log-normal sigma).
const CARD_AMOUNT_SIGMA: f64 = 0.7;
/// Amount bounds: 1.00 to 25 000.00.
pub(crate) const AMOUNT_MIN_MINOR: u64 = 100;
pub(crate) const AMOUNT_MAX_MINOR: u64 = 2_500_000;
/// Legitimate purchases by local hour: quiet at night, busy at lunch and early evening.
const HOUR_WEIGHTS: [u32; 24] = [
    2, 1, 1, 1, 1, 2, 4, 7, 9, 10, 11, 13, 14, 12, 11, 11, 12, 13, 13, 11, 9, 7, 5, 3,
];
const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// One card: its number and habits.
#[derive(Debug, Clone)]
pub(crate) struct Card {
    pan: [u8; PAN_LEN],
    pub(crate) home: u8,
    pub(crate) typical_amount_minor: u32,
    ecommerce_per_mille: u16,
    usual_mccs: [u16; 3],
}

/// One merchant; its terminals are `first_terminal..first_terminal + terminals`.
#[derive(Debug, Clone)]
pub(crate) struct Merchant {
    mcc: u16,
    country: u8,
    /// 0 (safe) to 100 (high risk); describes the population, not a label.
    #[allow(dead_code)] // kept so the population reads as documented
    risk: u8,
    pub(crate) first_terminal: u32,
    pub(crate) terminals: u32,
}

/// Cards, merchants and terminals, and indexes to draw from them.
#[derive(Debug, Clone)]
pub struct Population {
    pub(crate) cards: Vec<Card>,
    /// Running sum of card activity weights, to draw cards by activity.
    activity: Vec<u64>,
    pub(crate) merchants: Vec<Merchant>,
    /// Merchant of each terminal.
    terminal_merchant: Vec<u32>,
    /// Merchants by (country index, MCC, e-commerce); every combination has one.
    by_kind: HashMap<(u8, u16, bool), Vec<u32>>,
    /// E-commerce merchants by country index.
    pub(crate) ecommerce_by_country: Vec<Vec<u32>>,
    /// Physical merchants.
    pub(crate) physical: Vec<u32>,
}

fn all_mccs() -> impl Iterator<Item = u16> {
    EVERYDAY_MCCS
        .iter()
        .map(|&(mcc, _)| mcc)
        .chain(HIGH_RISK_MCCS.iter().copied().filter(|m| *m != 5732))
}

/// Index drawn from per-cent (or any) weights.
fn weighted<T>(rng: &mut impl Rng, items: &[T], weight: impl Fn(&T) -> u32) -> usize {
    let total: u32 = items.iter().map(&weight).sum();
    let mut x = rng.gen_range(0..total.max(1));
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if x < w {
            return i;
        }
        x -= w;
    }
    items.len() - 1
}

impl Population {
    /// A population sized for `count` transactions.
    pub fn new(count: u64, rng: &mut impl Rng) -> Population {
        let cards_n = (count / PURCHASES_PER_CARD).clamp(MIN_CARDS, MAX_CARDS);
        // Seeds start their accounts at different numbers, so two data sets share few PANs.
        let first_account = rng.gen_range(0..ACCOUNT_DIGITS_MOD);
        let cards: Vec<Card> = (0..cards_n)
            .map(|i| new_card(i, first_account, rng))
            .collect();
        let mut sum = 0u64;
        let activity = (0..cards.len())
            .map(|_| {
                // Activity is skewed: a few cards are used daily, many now and then.
                sum += (log_normal(rng, 100.0, 0.8) as u64).clamp(5, 2_000);
                sum
            })
            .collect();
        let mut population = Population {
            cards,
            activity,
            merchants: Vec::new(),
            terminal_merchant: Vec::new(),
            by_kind: HashMap::new(),
            ecommerce_by_country: vec![Vec::new(); COUNTRIES.len()],
            physical: Vec::new(),
        };
        for country in 0..COUNTRIES.len() as u8 {
            for mcc in all_mccs() {
                for ecommerce in [false, true] {
                    population.add_merchant(country, mcc, ecommerce, rng);
                }
            }
        }
        let extra = (cards_n / CARDS_PER_MERCHANT).max(MIN_MERCHANTS);
        for _ in 0..extra {
            let country = weighted(rng, &COUNTRIES[..HOME_COUNTRIES], |c| c.2) as u8;
            let mcc = EVERYDAY_MCCS[weighted(rng, &EVERYDAY_MCCS, |m| m.1)].0;
            let ecommerce = rng.gen_range(0..1000) < ECOMMERCE_MERCHANT_PER_MILLE;
            population.add_merchant(country, mcc, ecommerce, rng);
        }
        population
    }

    fn add_merchant(&mut self, country: u8, mcc: u16, ecommerce: bool, rng: &mut impl Rng) {
        let index = self.merchants.len() as u32;
        let high_risk = HIGH_RISK_MCCS.contains(&mcc) || usize::from(country) >= HOME_COUNTRIES;
        let risk = if high_risk {
            rng.gen_range(60..=95)
        } else {
            rng.gen_range(1..=30)
        };
        let terminals = if ecommerce {
            1
        } else {
            rng.gen_range(1..=MAX_TERMINALS_PER_MERCHANT)
        };
        let first_terminal = self.terminal_merchant.len() as u32;
        self.terminal_merchant
            .extend(std::iter::repeat_n(index, terminals as usize));
        self.merchants.push(Merchant {
            mcc,
            country,
            risk,
            first_terminal,
            terminals,
        });
        self.by_kind
            .entry((country, mcc, ecommerce))
            .or_default()
            .push(index);
        if ecommerce {
            self.ecommerce_by_country[usize::from(country)].push(index);
        } else {
            self.physical.push(index);
        }
    }

    /// Time span of `count` transactions: about [`PURCHASES_PER_CARD_DAY`] per card.
    pub fn span_ms(&self, count: u64) -> i64 {
        let days = (count as f64 / (self.cards.len() as f64 * PURCHASES_PER_CARD_DAY)).ceil();
        (days as u64).clamp(1, MAX_SPAN_DAYS) as i64 * MS_PER_DAY
    }

    /// Local time offset of a country index, milliseconds.
    pub(crate) fn offset_ms(country: u8) -> i64 {
        COUNTRIES[usize::from(country)].3 * MS_PER_HOUR
    }

    /// A card drawn by activity.
    fn active_card(&self, rng: &mut impl Rng) -> u32 {
        let total = self.activity.last().copied().unwrap_or(1);
        let x = rng.gen_range(0..total);
        self.activity.partition_point(|&s| s <= x) as u32
    }

    /// A merchant of this kind (every kind has one).
    pub(crate) fn merchant_of(
        &self,
        country: u8,
        mcc: u16,
        ecommerce: bool,
        rng: &mut impl Rng,
    ) -> u32 {
        let list = &self.by_kind[&(country, mcc, ecommerce)];
        list[pick(rng, list.len()) as usize]
    }

    /// A terminal of merchant `m`.
    pub(crate) fn terminal_of(&self, m: u32, rng: &mut impl Rng) -> u32 {
        let merchant = &self.merchants[m as usize];
        merchant.first_terminal + rng.gen_range(0..merchant.terminals)
    }

    /// An amount around card `c`'s typical amount, scaled.
    pub(crate) fn amount_of(&self, c: u32, scale: f64, rng: &mut impl Rng) -> u64 {
        let typical = f64::from(self.cards[c as usize].typical_amount_minor) * scale;
        (log_normal(rng, typical, CARD_AMOUNT_SIGMA) as u64)
            .clamp(AMOUNT_MIN_MINOR, AMOUNT_MAX_MINOR)
    }

    /// A legitimate purchase somewhere in `start_ms..start_ms + span_ms`, following a card's
    /// habits.
    pub(crate) fn legit_event(&self, start_ms: i64, span_ms: i64, rng: &mut impl Rng) -> Event {
        let c = self.active_card(rng);
        let card = &self.cards[c as usize];
        let country = if rng.gen_range(0..1000) < TRAVEL_PER_MILLE {
            pick(rng, HOME_COUNTRIES) as u8
        } else {
            card.home
        };
        let mcc = if rng.gen_range(0..1000) < UNUSUAL_MCC_PER_MILLE {
            EVERYDAY_MCCS[pick(rng, EVERYDAY_MCCS.len()) as usize].0
        } else {
            card.usual_mccs[pick(rng, card.usual_mccs.len()) as usize]
        };
        let ecommerce = rng.gen_range(0..1000) < u32::from(card.ecommerce_per_mille);
        let merchant = self.merchant_of(country, mcc, ecommerce, rng);
        let local_hour = weighted(rng, &HOUR_WEIGHTS, |w| *w) as i64;
        let day = rng.gen_range(0..span_ms / MS_PER_DAY);
        let local_ms = day * MS_PER_DAY + local_hour * MS_PER_HOUR + rng.gen_range(0..MS_PER_HOUR);
        let time_ms = start_ms + (local_ms - Self::offset_ms(country)).rem_euclid(span_ms);
        Event {
            time_ms,
            amount_minor: self.amount_of(c, 1.0, rng),
            card: c,
            terminal: self.terminal_of(merchant, rng),
            pos_entry_mode: pos_entry_mode(ecommerce, rng),
            scenario: None,
        }
    }

    /// The CSV row of an event.
    pub fn row(&self, event: &EventRow) -> LabeledTransaction {
        let e = &event.0;
        let card = &self.cards[e.card as usize];
        let m = self.terminal_merchant[e.terminal as usize];
        let merchant = &self.merchants[m as usize];
        let (country, currency, _, _) = COUNTRIES[usize::from(merchant.country)];
        LabeledTransaction {
            timestamp: rfc3339_ms(e.time_ms),
            pan: String::from_utf8_lossy(&card.pan).into_owned(),
            amount_minor: e.amount_minor,
            currency,
            mcc: merchant.mcc,
            merchant_id: format!("MER{m:012}"),
            terminal_id: format!("T{:07}", e.terminal),
            country,
            pos_entry_mode: e.pos_entry_mode,
            is_fraud: u8::from(e.scenario.is_some()),
            scenario: e.scenario.map_or("none", |s| s.name()).to_owned(),
        }
    }
}

/// POS entry mode of a purchase: e-commerce 81 (credentials on file) or 10 (keyed);
/// in store chip 51 mostly, contactless 71, magnetic stripe 90 rarely.
fn pos_entry_mode(ecommerce: bool, rng: &mut impl Rng) -> u16 {
    match (ecommerce, rng.gen_range(0..100)) {
        (true, 0..70) => 81,
        (true, _) => 10,
        (false, 0..90) => 51,
        (false, 90..98) => 71,
        (false, _) => 90,
    }
}

/// Multiplier of the 9 account digits: odd and not a multiple of 5, so `index * M mod 10^9`
/// is a bijection and no two cards share a PAN.
const ACCOUNT_SPREAD: u64 = 387_420_489;
const ACCOUNT_DIGITS_MOD: u64 = 1_000_000_000;

fn new_card(index: u64, first_account: u64, rng: &mut impl Rng) -> Card {
    let bin = BINS[(index % BINS.len() as u64) as usize];
    let spread = (index / BINS.len() as u64).wrapping_mul(ACCOUNT_SPREAD);
    let account = (first_account + spread % ACCOUNT_DIGITS_MOD) % ACCOUNT_DIGITS_MOD;
    let payload = format!("{bin}{account:09}");
    let mut pan = [b'0'; PAN_LEN];
    pan[..PAN_LEN - 1].copy_from_slice(payload.as_bytes());
    pan[PAN_LEN - 1] = luhn_check_digit(&pan[..PAN_LEN - 1]);
    let home = weighted(rng, &COUNTRIES[..HOME_COUNTRIES], |c| c.2) as u8;
    let mut usual_mccs = [0u16; 3];
    for slot in &mut usual_mccs {
        *slot = EVERYDAY_MCCS[weighted(rng, &EVERYDAY_MCCS, |m| m.1)].0;
    }
    Card {
        pan,
        home,
        typical_amount_minor: (log_normal(rng, 3_500.0, 0.6) as u32).clamp(500, 50_000),
        ecommerce_per_mille: rng.gen_range(20..300),
        usual_mccs,
    }
}
