//! Labeled fraud scenarios, each a burst over a short time.

use std::collections::HashSet;

use rand::Rng;

use super::population::{
    Population, AMOUNT_MAX_MINOR, AMOUNT_MIN_MINOR, COUNTRIES, HIGH_RISK_MCCS,
};
use super::{pick, Event};

/// A fraud scenario; its name is the `scenario` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Many small amounts across several e-commerce merchants within minutes.
    CardTesting,
    /// Sudden large e-commerce spend in a new country at odd hours.
    AccountTakeover,
    /// Many high-risk-MCC purchases within minutes.
    StolenCard,
    /// Many distinct cards at one terminal in a short window.
    CompromisedTerminal,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 4] = [
        Scenario::CardTesting,
        Scenario::AccountTakeover,
        Scenario::StolenCard,
        Scenario::CompromisedTerminal,
    ];

    /// The word in the `scenario` column.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::CardTesting => "card_testing",
            Scenario::AccountTakeover => "account_takeover",
            Scenario::StolenCard => "stolen_card",
            Scenario::CompromisedTerminal => "compromised_terminal",
        }
    }

    /// Share of bursts, per cent.
    fn weight(self) -> u32 {
        match self {
            Scenario::CardTesting => 30,
            Scenario::AccountTakeover => 20,
            Scenario::StolenCard => 25,
            Scenario::CompromisedTerminal => 25,
        }
    }
}

/// Room left at the end of the span for a burst to finish: the longest burst is 30
/// purchases 90 s apart, 45 minutes.
const BURST_MARGIN_MS: i64 = 3_600_000;
/// Card testing probes: 1.00 to 5.00.
const PROBE_MIN_MINOR: u64 = 100;
const PROBE_MAX_MINOR: u64 = 500;
/// Tries to find a card not yet used in one compromised-terminal burst before giving up on
/// it: the population has at least 500 cards and a burst at most 30.
const DISTINCT_CARD_TRIES: u32 = 16;
const MS_PER_HOUR: i64 = 3_600_000;

/// Appends fraud bursts to `events` until exactly `target` fraud events are there (the last
/// burst cut short). The first four bursts are one of each scenario, so any data set with a
/// few dozen fraud rows has all of them.
pub(crate) fn fraud(
    population: &Population,
    start_ms: i64,
    span_ms: i64,
    target: u64,
    rng: &mut impl Rng,
    events: &mut Vec<Event>,
) {
    let target = usize::try_from(target).unwrap_or(usize::MAX);
    let latest_start = (span_ms - BURST_MARGIN_MS).max(1);
    let mut burst = 0usize;
    while events.len() < target {
        let scenario = match Scenario::ALL.get(burst) {
            Some(s) => *s,
            None => {
                let weights = Scenario::ALL.map(Scenario::weight);
                let mut x = rng.gen_range(0..weights.iter().sum::<u32>());
                let i = weights.iter().position(|&w| {
                    let hit = x < w;
                    x = x.saturating_sub(w);
                    hit
                });
                Scenario::ALL[i.unwrap_or(0)]
            }
        };
        let t0 = start_ms + rng.gen_range(0..latest_start);
        let ctx = Burst {
            population,
            scenario,
            t0,
        };
        match scenario {
            Scenario::CardTesting => ctx.card_testing(rng, events),
            Scenario::AccountTakeover => ctx.account_takeover(rng, events),
            Scenario::StolenCard => ctx.stolen_card(rng, events),
            Scenario::CompromisedTerminal => ctx.compromised_terminal(rng, events),
        }
        burst += 1;
    }
    events.truncate(target);
}

struct Burst<'a> {
    population: &'a Population,
    scenario: Scenario,
    t0: i64,
}

impl Burst<'_> {
    fn event(&self, time_ms: i64, card: u32, terminal: u32, amount: u64, pos: u16) -> Event {
        Event {
            time_ms,
            amount_minor: amount,
            card,
            terminal,
            pos_entry_mode: pos,
            scenario: Some(self.scenario),
        }
    }

    fn victim(&self, rng: &mut impl Rng) -> u32 {
        pick(rng, self.population.cards.len())
    }

    fn card_testing(&self, rng: &mut impl Rng, events: &mut Vec<Event>) {
        let p = self.population;
        let card = self.victim(rng);
        let mut t = self.t0;
        for _ in 0..rng.gen_range(5..=20) {
            t += rng.gen_range(5_000..60_000);
            let country = pick(rng, COUNTRIES.len()) as usize;
            let merchants = &p.ecommerce_by_country[country];
            let merchant = merchants[pick(rng, merchants.len()) as usize];
            let amount = rng.gen_range(PROBE_MIN_MINOR..=PROBE_MAX_MINOR);
            let terminal = p.terminal_of(merchant, rng);
            events.push(self.event(t, card, terminal, amount, 81));
        }
    }

    fn account_takeover(&self, rng: &mut impl Rng, events: &mut Vec<Event>) {
        let p = self.population;
        let card = self.victim(rng);
        let home = p.cards[card as usize].home;
        let country = loop {
            let c = pick(rng, COUNTRIES.len()) as u8;
            if c != home {
                break c;
            }
        };
        // Odd hours where the card lives: 01:00 to 04:59 local.
        let day_start = self.t0 - self.t0.rem_euclid(24 * MS_PER_HOUR);
        let local_hour = rng.gen_range(1..5);
        let mut t = day_start + local_hour * MS_PER_HOUR - Population::offset_ms(home);
        if t < self.t0 {
            // Those hours were before the burst's slot (perhaps before the data): next night.
            t += 24 * MS_PER_HOUR;
        }
        let merchants = &p.ecommerce_by_country[usize::from(country)];
        for _ in 0..rng.gen_range(2..=6) {
            t += rng.gen_range(60_000..600_000);
            let merchant = merchants[pick(rng, merchants.len()) as usize];
            let amount = p
                .amount_of(card, rng.gen_range(10.0..40.0), rng)
                .max(50_000);
            let pos = if rng.gen_bool(0.7) { 81 } else { 10 };
            let terminal = p.terminal_of(merchant, rng);
            events.push(self.event(t, card, terminal, amount, pos));
        }
    }

    fn stolen_card(&self, rng: &mut impl Rng, events: &mut Vec<Event>) {
        let p = self.population;
        let card = self.victim(rng);
        let home = p.cards[card as usize].home;
        let mut t = self.t0;
        for _ in 0..rng.gen_range(4..=12) {
            t += rng.gen_range(30_000..240_000);
            let mcc = HIGH_RISK_MCCS[pick(rng, HIGH_RISK_MCCS.len()) as usize];
            let merchant = p.merchant_of(home, mcc, false, rng);
            // Log-uniform 200.00 to 3 000.00: the thief buys what resells.
            let amount = (20_000.0 * 15f64.powf(rng.gen::<f64>())) as u64;
            let pos = if rng.gen_bool(0.7) { 51 } else { 90 };
            let terminal = p.terminal_of(merchant, rng);
            events.push(self.event(t, card, terminal, amount, pos));
        }
    }

    fn compromised_terminal(&self, rng: &mut impl Rng, events: &mut Vec<Event>) {
        let p = self.population;
        let merchant = p.physical[pick(rng, p.physical.len()) as usize];
        let terminal = p.terminal_of(merchant, rng);
        let mut used = HashSet::new();
        let mut t = self.t0;
        for _ in 0..rng.gen_range(8..=30) {
            let Some(card) = (0..DISTINCT_CARD_TRIES)
                .find_map(|_| Some(self.victim(rng)).filter(|c| used.insert(*c)))
            else {
                continue;
            };
            t += rng.gen_range(10_000..90_000);
            let amount = p
                .amount_of(card, rng.gen_range(1.0..3.0), rng)
                .clamp(AMOUNT_MIN_MINOR, AMOUNT_MAX_MINOR);
            // Cloned stripes from a skimmer mostly; some chip fallbacks.
            let pos = if rng.gen_bool(0.7) { 90 } else { 51 };
            events.push(self.event(t, card, terminal, amount, pos));
        }
    }
}
