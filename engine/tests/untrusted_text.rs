//! Text that reaches the switch from outside — a configuration file, a rules file — is
//! parsed without panicking, whatever it holds: an error names what is wrong, or it is
//! accepted and checks out. A bounded run of generated inputs on every CI run (cargo-fuzz
//! needs a nightly toolchain; these run on stable). The codec, framing, journal and model
//! file readers have theirs beside them (`protocol/tests/roundtrip.rs`,
//! `engine/tests/journal.rs`, `models/src/model.rs`).

use payswitch::config::Config;
use payswitch::scoring::rules::Rules;
use proptest::prelude::*;

/// The shipped example configuration, to mutate.
const CONFIG: &str = include_str!("../../config/payswitch.example.toml");

/// The shipped example rules, to mutate.
const RULES: &str = include_str!("../../config/rules.example.toml");

/// `text` with the bytes at `at` replaced by `with` (kept on a character boundary).
fn mutate(text: &str, at: usize, len: usize, with: &str) -> String {
    let mut start = at % (text.len() + 1);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + len).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}{}", &text[..start], with, &text[end..])
}

fn checked(text: &str) -> Result<Config, String> {
    let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
    config.check().map_err(|e| e.to_string())?;
    Ok(config)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn any_text_as_a_config_is_refused_or_checks_out(text in "\\PC{0,400}") {
        let _ = checked(&text);
    }

    #[test]
    fn a_mutated_config_is_refused_with_a_reason_or_checks_out(
        at in 0usize..6_000,
        len in 0usize..12,
        with in "[0-9a-z\"\\[\\]=.,\\- \n]{0,12}",
    ) {
        if let Err(reason) = checked(&mutate(CONFIG, at, len, &with)) {
            prop_assert!(!reason.is_empty());
        }
    }

    #[test]
    fn any_text_as_rules_is_refused_or_compiles(text in "\\PC{0,300}") {
        let _ = Rules::parse(&text, payswitch::scoring::rule_variables());
    }

    #[test]
    fn mutated_rules_are_refused_with_a_reason_or_compile(
        at in 0usize..2_000,
        len in 0usize..8,
        with in "[0-9a-z_ ()&|!<>=.+*/\"\\-]{0,10}",
    ) {
        if let Err(e) = Rules::parse(&mutate(RULES, at, len, &with), payswitch::scoring::rule_variables()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn the_seeds_themselves_check_out() {
    checked(CONFIG).unwrap();
    Rules::parse(RULES, payswitch::scoring::rule_variables()).unwrap();
}
