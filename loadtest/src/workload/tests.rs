use std::collections::{BTreeMap, HashSet};

use payswitch_models::data::read_all;
use payswitch_protocol::types::luhn_valid;

use super::*;

fn bytes_of(config: &GenConfig) -> Vec<u8> {
    let mut out = Vec::new();
    write_workload(config, &mut out).unwrap();
    out
}

#[test]
fn same_seed_gives_the_same_bytes() {
    let config = GenConfig::new(20_000, 7);
    let a = bytes_of(&config);
    assert_eq!(a, bytes_of(&config));
    assert_ne!(a, bytes_of(&GenConfig::new(20_000, 8)));
}

#[test]
fn file_rereads_time_ordered_with_valid_pans_and_ids() {
    // More than one write chunk, so chunk joins are checked too.
    let config = GenConfig::new(150_000, 3);
    let rows = read_all(&bytes_of(&config)[..]).unwrap();
    assert_eq!(rows.len(), 150_000);
    assert_eq!(rows, generate(&config).unwrap());
    let times: Vec<i64> = rows.iter().map(|r| r.timestamp_ms().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not time-ordered");
    assert!(times[0] >= config.start_ms);
    for row in &rows {
        assert!(luhn_valid(row.pan.as_bytes()), "{row:?}");
        assert!(row.merchant_id.len() <= 15 && row.terminal_id.len() == 8);
        assert!(row.country < 1000 && row.currency < 1000 && row.pos_entry_mode < 1000);
        assert_eq!(row.is_fraud == 1, row.scenario != "none", "{row:?}");
    }
    let bins: HashSet<&str> = rows.iter().map(|r| &r.pan[..6]).collect();
    assert!(
        bins.contains("400000") && bins.contains("510000"),
        "{bins:?}"
    );
}

#[test]
fn fraud_rate_is_met_and_every_scenario_is_present() {
    for (rate, count) in [(DEFAULT_FRAUD_RATE, 100_000u64), (0.02, 50_000)] {
        let config = GenConfig {
            fraud_rate: rate,
            ..GenConfig::new(count, 11)
        };
        let rows = generate(&config).unwrap();
        let fraud = rows.iter().filter(|r| r.is_fraud == 1).count() as f64;
        let measured = fraud / rows.len() as f64;
        assert!(
            (measured - rate).abs() <= rate * 0.01,
            "{measured} vs {rate}"
        );
        let mut by_scenario: BTreeMap<&str, u64> = BTreeMap::new();
        for row in rows.iter().filter(|r| r.is_fraud == 1) {
            *by_scenario.entry(&row.scenario).or_default() += 1;
        }
        for s in Scenario::ALL {
            assert!(
                by_scenario.get(s.name()).copied().unwrap_or(0) > 0,
                "{by_scenario:?}"
            );
        }
    }
}

#[test]
fn scenarios_look_like_their_names() {
    let config = GenConfig {
        fraud_rate: 0.05,
        ..GenConfig::new(40_000, 5)
    };
    let rows = generate(&config).unwrap();
    let of = |name: &'static str| rows.iter().filter(move |r| r.scenario == name);
    assert!(of("card_testing").all(|r| (100..=500).contains(&r.amount_minor)));
    assert!(of("card_testing").all(|r| r.pos_entry_mode == 81));
    assert!(of("stolen_card").all(|r| [5732, 5944, 4829, 6051].contains(&r.mcc)));
    assert!(of("account_takeover").all(|r| r.amount_minor >= 50_000));
    let legit_chip = rows
        .iter()
        .filter(|r| r.is_fraud == 0 && r.pos_entry_mode == 51)
        .count();
    assert!(legit_chip * 2 > rows.len(), "chip is the usual entry mode");
    let usd = rows.iter().filter(|r| r.currency == 840).count();
    assert!(usd * 2 > rows.len(), "most cards are American");
}

#[test]
fn no_fraud_rate_and_bad_arguments() {
    let config = GenConfig {
        fraud_rate: 0.0,
        ..GenConfig::new(1_000, 1)
    };
    assert!(generate(&config).unwrap().iter().all(|r| r.is_fraud == 0));
    assert!(generate(&GenConfig::new(0, 1)).is_err());
    let too_much = GenConfig {
        fraud_rate: 0.9,
        ..GenConfig::new(10, 1)
    };
    assert!(generate(&too_much).is_err());
    assert_eq!(rfc3339_ms(1_795_609_845_250), "2026-11-25T12:30:45.250Z");
}
