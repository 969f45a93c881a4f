//! `load --data`: a labeled file replayed in file order, and the labels of what was sent.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{ensure, Context};
use payswitch_models::data::{read_all, LabeledTransaction};
use payswitch_protocol::time::UtcDateTime;
use payswitch_protocol::{Message, Stan};

use crate::cards::{labeled_authorization, StanCounter};

/// Largest data file read. The file is loaded whole (about 250 bytes of memory per row
/// against about 100 in the file): 256 MiB is some 2.5 million rows and 600 MiB of memory,
/// far more than a load run of minutes sends.
pub const MAX_DATA_BYTES: u64 = 256 * 1024 * 1024;
/// Distinct scenario words counted apart; rows with further words count as "other", so a
/// file cannot grow the report without bound.
pub const MAX_SCENARIOS: usize = 32;
/// The word under which scenarios beyond [`MAX_SCENARIOS`] are counted.
const OTHER_SCENARIO: &str = "other";
/// Response code of a decline for suspected fraud.
pub const FRAUD_DECLINE: &str = "59";
/// Years ahead of the cards' expiry: a data file has no expiry, and an expired card would
/// be declined for the wrong reason.
const EXPIRY_YEARS_AHEAD: u32 = 3;

/// The label of one request, carried with it until its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Label {
    pub(crate) amount_minor: u64,
    /// Index into [`DataSet::scenarios`] for fraud, `None` for legitimate.
    pub(crate) scenario: Option<u8>,
}

/// One row ready to send.
struct DataRow {
    row: LabeledTransaction,
    stan: Stan,
    label: Label,
}

/// A labeled file, loaded and checked.
pub(crate) struct DataSet {
    rows: Vec<DataRow>,
    /// Scenario words of the fraud rows, by index.
    pub(crate) scenarios: Vec<String>,
    expiry: String,
}

impl DataSet {
    /// Reads and checks `path`: every row must make a valid 0100 (errors give the line,
    /// never a PAN). STANs are given per terminal in file order, once, so every connection
    /// sending a terminal's rows continues the same sequence.
    pub(crate) fn load(path: &Path) -> anyhow::Result<DataSet> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        ensure!(
            size <= MAX_DATA_BYTES,
            "{} is over {MAX_DATA_BYTES} bytes; split it",
            path.display()
        );
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let rows = read_all(std::io::BufReader::new(file))
            .with_context(|| format!("reading {}", path.display()))?;
        ensure!(!rows.is_empty(), "{} has no rows", path.display());
        DataSet::from_rows(rows)
    }

    pub(crate) fn from_rows(rows: Vec<LabeledTransaction>) -> anyhow::Result<DataSet> {
        let now = UtcDateTime::from_system_time(SystemTime::now());
        let expiry = format!("{:02}12", (now.year() + EXPIRY_YEARS_AHEAD) % 100);
        let mut stans: HashMap<String, StanCounter> = HashMap::new();
        let mut scenarios: Vec<String> = Vec::new();
        let mut out = Vec::with_capacity(rows.len());
        for (i, row) in rows.into_iter().enumerate() {
            let stan = stans
                .entry(row.terminal_id.clone())
                .or_default()
                .next_stan();
            // Checked once here, so a row that cannot be sent fails the run before it starts.
            labeled_authorization(&row, stan, "000000000000", &expiry)
                .with_context(|| format!("line {}", i + 2))?;
            let scenario = (row.is_fraud == 1).then(|| intern(&mut scenarios, &row.scenario));
            let label = Label {
                amount_minor: row.amount_minor,
                scenario,
            };
            out.push(DataRow { row, stan, label });
        }
        Ok(DataSet {
            rows: out,
            scenarios,
            expiry,
        })
    }

    /// Rows in the file.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The request of row `index` and its label; `None` past the end or if it cannot be
    /// built (checked at load, so never).
    pub(crate) fn request(&self, index: u64, rrn: &str) -> Option<(Message, Label)> {
        let data = self.rows.get(usize::try_from(index).ok()?)?;
        let message = labeled_authorization(&data.row, data.stan, rrn, &self.expiry).ok()?;
        Some((message, data.label))
    }

    /// What the first `sent` rows hold.
    pub(crate) fn sent_summary(&self, sent: u64) -> SentSummary {
        let mut summary = SentSummary::default();
        let sent = usize::try_from(sent).unwrap_or(usize::MAX);
        for data in self.rows.iter().take(sent) {
            if let Some(s) = data.label.scenario {
                summary.fraud_sent += 1;
                summary.fraud_amount_minor += data.label.amount_minor;
                *summary
                    .fraud_sent_by_scenario
                    .entry(self.scenarios[usize::from(s)].clone())
                    .or_default() += 1;
            }
        }
        summary
    }
}

/// The scenario index of `word`, adding it while there is room.
fn intern(scenarios: &mut Vec<String>, word: &str) -> u8 {
    if let Some(i) = scenarios.iter().position(|s| s == word) {
        return i as u8;
    }
    if scenarios.len() < MAX_SCENARIOS - 1 {
        scenarios.push(word.to_owned());
        return (scenarios.len() - 1) as u8;
    }
    match scenarios.iter().position(|s| s == OTHER_SCENARIO) {
        Some(i) => i as u8,
        None => {
            scenarios.push(OTHER_SCENARIO.to_owned());
            (scenarios.len() - 1) as u8
        }
    }
}

/// The labels of the rows a run sent, whatever became of them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SentSummary {
    pub(crate) fraud_sent: u64,
    pub(crate) fraud_amount_minor: u64,
    pub(crate) fraud_sent_by_scenario: BTreeMap<String, u64>,
}

/// Outcomes of labeled requests that were answered (one connection's, then merged).
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelTally {
    pub(crate) fraud_caught: u64,
    pub(crate) legit_declined: u64,
    pub(crate) fraud_amount_caught_minor: u64,
    /// Fraud caught by scenario index.
    pub(crate) caught_by_scenario: BTreeMap<u8, u64>,
}

impl LabelTally {
    pub(crate) fn answered(&mut self, label: Label, code: &str) {
        if code != FRAUD_DECLINE {
            return;
        }
        match label.scenario {
            Some(s) => {
                self.fraud_caught += 1;
                self.fraud_amount_caught_minor += label.amount_minor;
                *self.caught_by_scenario.entry(s).or_default() += 1;
            }
            None => self.legit_declined += 1,
        }
    }

    pub(crate) fn merge(&mut self, other: &LabelTally) {
        self.fraud_caught += other.fraud_caught;
        self.legit_declined += other.legit_declined;
        self.fraud_amount_caught_minor += other.fraud_amount_caught_minor;
        for (s, n) in &other.caught_by_scenario {
            *self.caught_by_scenario.entry(*s).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(terminal: &str, fraud: bool, scenario: &str, amount: u64) -> LabeledTransaction {
        LabeledTransaction {
            timestamp: "2026-11-25T13:45:00Z".into(),
            pan: "4000001234567899".into(),
            amount_minor: amount,
            currency: 840,
            mcc: 5411,
            merchant_id: "M1".into(),
            terminal_id: terminal.into(),
            country: 840,
            pos_entry_mode: 51,
            is_fraud: u8::from(fraud),
            scenario: scenario.into(),
        }
    }

    #[test]
    fn stans_count_per_terminal_and_labels_tally() {
        let rows = vec![
            row("A", false, "none", 100),
            row("B", true, "card_testing", 200),
            row("A", true, "stolen_card", 300),
        ];
        let data = DataSet::from_rows(rows).unwrap();
        let stans: Vec<u32> = data.rows.iter().map(|r| r.stan.get()).collect();
        assert_eq!(stans, [1, 1, 2]);
        let summary = data.sent_summary(2);
        assert_eq!((summary.fraud_sent, summary.fraud_amount_minor), (1, 200));
        let mut tally = LabelTally::default();
        for (i, code) in [(0, "59"), (1, "59"), (2, "00")] {
            tally.answered(data.request(i, "ABC123DEF456").unwrap().1, code);
        }
        assert_eq!((tally.fraud_caught, tally.legit_declined), (1, 1));
        assert_eq!(tally.fraud_amount_caught_minor, 200);
        assert!(data.request(3, "ABC123DEF456").is_none());
    }

    #[test]
    fn a_bad_row_is_refused_with_its_line() {
        let mut bad = row("A", false, "none", 100);
        bad.merchant_id = "M".repeat(16);
        let err = DataSet::from_rows(vec![row("A", false, "none", 1), bad])
            .err()
            .unwrap();
        assert!(format!("{err:#}").starts_with("line 3"), "{err:#}");
    }

    #[test]
    fn scenario_words_are_bounded() {
        let mut words = Vec::new();
        for i in 0..100 {
            intern(&mut words, &format!("s{i}"));
        }
        assert_eq!(words.len(), MAX_SCENARIOS);
        assert_eq!(words.last().map(String::as_str), Some(OTHER_SCENARIO));
    }
}
