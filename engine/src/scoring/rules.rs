//! Rules for risk teams: named CEL expressions over features and message fields, evaluated
//! after the model, hot-reloaded from a file.
//!
//! ```toml
//! [[rule]]
//! name = "large_ecommerce_abroad"
//! when = "amount_minor > 100000 && pos_entry_mode == 10 && foreign_country > 0.5"
//! action = "decline"          # decline | review | approve | add_score
//!
//! [[rule]]
//! name = "card_testing_burst"
//! when = "card_count_1m >= 5 && amount_minor < 500"
//! action = "add_score"
//! add = 0.3
//! ```
//!
//! Every `add_score` rule that matches adds to the model's score (clamped to [0, 1]) before
//! the model's thresholds decide; then the first matching `decline`, `review` or `approve`
//! rule, in file order, overrides the decision. A rule referring to a variable the switch
//! does not provide is refused when the file is loaded, as is a rule that does not parse:
//! the whole file is refused and the rules in force stay. A rule that fails while running
//! (a type error, say) counts as not matching and is counted.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use cel_interpreter::{Context, Program, Value};
use serde::Deserialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Most rules in one file: each is evaluated per authorization, so the count bounds the
/// per-request cost.
pub const MAX_RULES: usize = 256;
/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_LEN: usize = 4_096;
/// How often the rules file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why a rules file was refused.
#[derive(Debug, Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not valid TOML of the rules format.
    #[error("rules file: {0}")]
    Toml(String),
    /// One rule is wrong.
    #[error("rule {name:?}: {reason}")]
    Rule {
        /// The rule's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Decline (59) whatever the model said.
    Decline,
    /// Mark for review.
    Review,
    /// Approve whatever the model said.
    Approve,
    /// Add this much to the model's score.
    AddScore(f32),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    when: String,
    action: String,
    #[serde(default)]
    add: Option<f32>,
}

struct Rule {
    name: String,
    program: Program,
    action: Action,
    variables: Vec<String>,
}

/// A compiled rule set.
pub struct Rules {
    rules: Vec<Rule>,
    /// Rule evaluations that failed at run time.
    pub errors: AtomicU64,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.names().collect::<Vec<_>>())
            .finish()
    }
}

/// The result of the rules for one authorization.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuleOutcome<'a> {
    /// Sum of the matching `add_score` rules.
    pub score_delta: f32,
    /// The first matching decline/review/approve rule: its action and name.
    pub decision: Option<(Action, &'a str)>,
}

thread_local! {
    /// Building a CEL context registers every built-in function; done once per thread and
    /// reused, with the variables replaced per evaluation.
    static CONTEXT: RefCell<Context<'static>> = RefCell::new(Context::default());
}

impl Rules {
    /// No rules.
    pub fn empty() -> Rules {
        Rules {
            rules: Vec::new(),
            errors: AtomicU64::new(0),
        }
    }

    /// Compiles a rules file. `known` are the variables the switch provides.
    pub fn parse(text: &str, known: &[&str]) -> Result<Rules, RulesError> {
        let file: RulesFile = toml::from_str(text).map_err(|e| RulesError::Toml(e.to_string()))?;
        if file.rule.len() > MAX_RULES {
            return Err(RulesError::Toml(format!("more than {MAX_RULES} rules")));
        }
        let mut rules = Vec::with_capacity(file.rule.len());
        for spec in file.rule {
            let bad = |reason: String| RulesError::Rule {
                name: spec.name.clone(),
                reason,
            };
            if rules.iter().any(|r: &Rule| r.name == spec.name) {
                return Err(bad("defined twice".into()));
            }
            if spec.when.len() > MAX_EXPRESSION_LEN {
                return Err(bad(format!(
                    "expression longer than {MAX_EXPRESSION_LEN} bytes"
                )));
            }
            let action = match (spec.action.as_str(), spec.add) {
                ("decline", None) => Action::Decline,
                ("review", None) => Action::Review,
                ("approve", None) => Action::Approve,
                ("add_score", Some(add)) if add.is_finite() => Action::AddScore(add),
                ("add_score", _) => return Err(bad("add_score needs a finite `add`".into())),
                (_, Some(_)) => return Err(bad("`add` goes with action add_score only".into())),
                (other, None) => return Err(bad(format!("unknown action {other:?}"))),
            };
            let program =
                Program::compile(&spec.when).map_err(|e| bad(format!("does not compile: {e}")))?;
            let variables: Vec<String> = program
                .references()
                .variables()
                .into_iter()
                .map(str::to_owned)
                .collect();
            if let Some(unknown) = variables.iter().find(|v| !known.contains(&v.as_str())) {
                return Err(bad(format!("unknown variable {unknown:?}")));
            }
            rules.push(Rule {
                name: spec.name,
                program,
                action,
                variables,
            });
        }
        Ok(Rules {
            rules,
            errors: AtomicU64::new(0),
        })
    }

    /// The rule names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Evaluates every rule; `lookup` gives a variable's value by name.
    pub fn evaluate(&self, lookup: impl Fn(&str) -> Option<Value>) -> RuleOutcome<'_> {
        let mut outcome = RuleOutcome::default();
        if self.rules.is_empty() {
            return outcome;
        }
        CONTEXT.with(|cell| {
            let mut context = cell.borrow_mut();
            for rule in &self.rules {
                if matches!(rule.action, Action::AddScore(_)) || outcome.decision.is_none() {
                    for name in &rule.variables {
                        if let Some(value) = lookup(name) {
                            context.add_variable_from_value(name.as_str(), value);
                        }
                    }
                    match rule.program.execute(&context) {
                        Ok(Value::Bool(true)) => match rule.action {
                            Action::AddScore(add) => outcome.score_delta += add,
                            action => outcome.decision = Some((action, rule.name.as_str())),
                        },
                        Ok(Value::Bool(false)) => {}
                        _ => {
                            self.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        outcome
    }
}

/// The rules in force, swapped whole when the file changes.
#[derive(Debug)]
pub struct RuleSet {
    current: ArcSwap<Rules>,
    /// The text the rules in force were compiled from ("" for none).
    text: ArcSwap<String>,
    path: Option<PathBuf>,
    known: &'static [&'static str],
    /// Reloads refused because the new file did not compile.
    pub refused_reloads: AtomicU64,
}

impl RuleSet {
    /// Loads `path` (or no rules); an invalid file is an error here, at start.
    pub fn load(
        path: Option<&Path>,
        known: &'static [&'static str],
    ) -> Result<RuleSet, RulesError> {
        let (rules, text) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)?;
                (Rules::parse(&text, known)?, text)
            }
            None => (Rules::empty(), String::new()),
        };
        Ok(RuleSet {
            current: ArcSwap::from_pointee(rules),
            text: ArcSwap::from_pointee(text),
            path: path.map(Path::to_owned),
            known,
            refused_reloads: AtomicU64::new(0),
        })
    }

    /// The rules in force now.
    pub fn current(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.current.load()
    }

    /// Re-reads the file: the new rules replace the old only if all of them compile.
    pub fn reload(&self) -> Result<usize, RulesError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let parsed = std::fs::read_to_string(path)
            .map_err(RulesError::from)
            .and_then(|text| Ok((Rules::parse(&text, self.known)?, text)));
        match parsed {
            Ok((rules, text)) => {
                let count = rules.rules.len();
                self.current.store(Arc::new(rules));
                self.text.store(Arc::new(text));
                tracing::info!(path = %path.display(), rules = count, "rules reloaded");
                Ok(count)
            }
            Err(e) => {
                self.refused_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %path.display(), error = %e, "rules file refused; the previous rules stay in force");
                Err(e)
            }
        }
    }

    /// The text of the rules in force ("" for none).
    pub fn text(&self) -> Arc<String> {
        self.text.load_full()
    }

    /// Puts the rules of `text` in force (a cluster's deployment from another node), if
    /// all of them compile; the file is left as it is.
    pub fn apply_text(&self, text: &str) -> Result<usize, RulesError> {
        let rules = Rules::parse(text, self.known)?;
        let count = rules.rules.len();
        self.current.store(Arc::new(rules));
        self.text.store(Arc::new(text.to_string()));
        Ok(count)
    }

    /// Polls the file's modification time and reloads on change, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut seen: Option<SystemTime> = modified(&path);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
            }
            let now = modified(&path);
            if now != seen {
                seen = now;
                let _ = self.reload();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["amount_minor", "card_count_1m", "score", "mcc"];

    fn lookup(amount: i64, count: f64) -> impl Fn(&str) -> Option<Value> {
        move |name| match name {
            "amount_minor" => Some(Value::Int(amount)),
            "card_count_1m" => Some(Value::Float(count)),
            "mcc" => Some(Value::Int(5411)),
            "score" => Some(Value::Float(0.1)),
            _ => None,
        }
    }

    const FILE: &str = r#"
        [[rule]]
        name = "burst"
        when = "card_count_1m >= 5 && amount_minor < 500"
        action = "add_score"
        add = 0.3
        [[rule]]
        name = "huge"
        when = "amount_minor > 1000000"
        action = "decline"
        [[rule]]
        name = "groceries_ok"
        when = "mcc == 5411"
        action = "approve"
    "#;

    #[test]
    fn add_score_accumulates_and_the_first_override_wins() {
        let rules = Rules::parse(FILE, KNOWN).unwrap();
        let outcome = rules.evaluate(lookup(100, 6.0));
        assert!((outcome.score_delta - 0.3).abs() < 1e-6);
        assert_eq!(outcome.decision, Some((Action::Approve, "groceries_ok")));
        let outcome = rules.evaluate(lookup(2_000_000, 0.0));
        assert_eq!(outcome.score_delta, 0.0);
        assert_eq!(outcome.decision, Some((Action::Decline, "huge")));
    }

    #[test]
    fn compile_errors_name_the_rule() {
        let bad = FILE.replace("amount_minor > 1000000", "amount_minor >");
        let err = Rules::parse(&bad, KNOWN).unwrap_err().to_string();
        assert!(err.starts_with("rule \"huge\": does not compile"), "{err}");
        let unknown = FILE.replace("mcc == 5411", "merchant_risk > 1");
        let err = Rules::parse(&unknown, KNOWN).unwrap_err().to_string();
        assert!(err.contains("unknown variable \"merchant_risk\""), "{err}");
        let action = FILE.replace("action = \"decline\"", "action = \"block\"");
        assert!(Rules::parse(&action, KNOWN)
            .unwrap_err()
            .to_string()
            .contains("unknown action"));
        let add = FILE.replace("add = 0.3", "");
        assert!(Rules::parse(&add, KNOWN).is_err());
    }

    #[test]
    fn malformed_expressions_are_errors_not_panics() {
        for when in [
            "(",
            ")",
            "&&",
            "amount_minor >",
            "1 +",
            "'open",
            "a.b.c(",
            "[1,",
            "{'a':",
            "!!",
            "",
        ] {
            let text = format!("[[rule]]\nname = \"r\"\nwhen = {when:?}\naction = \"decline\"\n");
            assert!(Rules::parse(&text, KNOWN).is_err(), "{when:?}");
        }
    }

    #[test]
    fn a_run_time_type_error_counts_and_does_not_match() {
        let rules = Rules::parse(
            "[[rule]]\nname = \"typo\"\nwhen = \"amount_minor + 'x' > 1\"\naction = \"decline\"\n",
            KNOWN,
        )
        .unwrap();
        assert_eq!(rules.evaluate(lookup(1, 0.0)).decision, None);
        assert_eq!(rules.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_refused_reload_keeps_the_rules_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, FILE).unwrap();
        let set = RuleSet::load(Some(&path), KNOWN).unwrap();
        assert_eq!(set.current().names().count(), 3);
        std::fs::write(
            &path,
            "[[rule]]\nname = \"x\"\nwhen = \"(\"\naction = \"decline\"\n",
        )
        .unwrap();
        assert!(set.reload().is_err());
        assert_eq!(set.current().names().count(), 3, "old rules stay");
        assert_eq!(set.refused_reloads.load(Ordering::Relaxed), 1);
        std::fs::write(
            &path,
            "[[rule]]\nname = \"x\"\nwhen = \"amount_minor > 1\"\naction = \"review\"\n",
        )
        .unwrap();
        assert_eq!(set.reload().unwrap(), 1);
        assert_eq!(set.current().names().collect::<Vec<_>>(), vec!["x"]);
    }
}
