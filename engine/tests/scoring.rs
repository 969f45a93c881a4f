//! Fraud scoring in the running switch, over loopback: a model trained on one generated
//! population scores another one replayed through the switch; declines never reach the
//! acquirer; hot deploys under load fail nothing; challengers never change a decision.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use payswitch::config::{Config, ScoringConfig};
use payswitch::scoring::EventTime;
use payswitch::switch::RunningSwitch;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_loadtest::load::{self, LoadConfig, Mode, Report};
use payswitch_loadtest::workload::{self, GenConfig};
use payswitch_models::model::{Model, ModelKind};
use payswitch_models::train::{self, TrainOptions};
use payswitch_net::ClientTrust;

mod support;

const TOKEN: &str = "test-admin-token";

fn write_data(dir: &Path, name: &str, count: u64, seed: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    workload::write_workload(&GenConfig::new(count, seed), std::io::BufWriter::new(file)).unwrap();
    path
}

fn train_model(data: &Path, kind: ModelKind, trees: u16, seed: u64) -> Model {
    let rows = payswitch_models::data::read_all(std::fs::File::open(data).unwrap()).unwrap();
    let options = TrainOptions {
        kind,
        trees,
        depth: 6,
        seed,
        ..TrainOptions::default()
    };
    train::train(&rows, &options).unwrap()
}

async fn start(sim: &RunningSim, scoring: ScoringConfig) -> RunningSwitch {
    let config = Config {
        scoring,
        admin_token: Some(TOKEN.into()),
        ..support::config(vec![support::acquirer("north", sim, 2_000)], vec![])
    };
    support::in_front_of(sim, config).await
}

fn replay(switch: &RunningSwitch, data: &Path, rate: f64, duration: Duration) -> LoadConfig {
    let mut config = LoadConfig::new(
        switch.quic_addr.unwrap(),
        ClientTrust::Roots(vec![switch.certificate.clone()]),
    );
    config.data = Some(data.to_owned());
    config.rate_tps = rate;
    config.duration = duration;
    // One pipelined stream keeps the file's order, so every card's and terminal's history
    // arrives as it would in time (velocity features are order-sensitive).
    config.connections = 1;
    config.mode = Mode::QuicPipelined;
    config
}

/// The default event time (field 7): a replayed file is scored on its own timeline, as a
/// risk analyst following the README's tour runs it.
fn scoring_with(model: &Path) -> ScoringConfig {
    ScoringConfig {
        model: Some(model.to_owned()),
        ..ScoringConfig::default()
    }
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn count(report: &Report, code: &str) -> u64 {
    report.codes.get(code).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_from_one_population_catches_fraud_in_another_replayed_through_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let train_data = write_data(dir.path(), "train.csv", 40_000, 1);
    let replay_data = write_data(dir.path(), "replay.csv", 4_000, 2);
    let model = train_model(&train_data, ModelKind::Forest, 30, 1);
    let model_path = dir.path().join("rf.pswm");
    std::fs::write(&model_path, model.to_bytes()).unwrap();

    let sim = acquirer_sim::start(SimConfig {
        approval_rate: 1.0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let switch = start(&sim, scoring_with(&model_path)).await;
    // The switch enqueues each stream's requests to their shards in the order it reads
    // them, so velocity features see the file's order even when it is saturated (before
    // that, a saturated test build declined 2.5-5 % of legitimate transactions instead of
    // 0.2-0.7 %).
    let report = load::run(replay(
        &switch,
        &replay_data,
        500.0,
        Duration::from_secs(10),
    ))
    .await
    .unwrap();
    let labels = report.labels.clone().expect("a labeled replay");
    eprintln!("{}", report.render());

    assert_eq!(report.errors, 0, "{}", report.render());
    assert_eq!(report.answered, 4_000);
    assert_eq!(count(&report, "96"), 0);
    assert!(labels.fraud_sent > 0);
    // Most fraud is caught, few legitimate cards are declined (a 30-tree model on 40k rows,
    // its decline threshold set at 0.5 % false positives on its training data).
    assert!(
        labels.fraud_caught * 2 > labels.fraud_sent,
        "caught {} of {}",
        labels.fraud_caught,
        labels.fraud_sent
    );
    assert!(
        labels.legit_declined * 50 < report.answered,
        "{}",
        report.render()
    );
    // Declined (59) authorizations never reached the acquirer.
    let reached = sim.stats.requests.load(Ordering::Relaxed);
    assert_eq!(reached, report.answered - count(&report, "59"));
    let decisions = &switch.switch.scoring.stats.decisions;
    assert_eq!(decisions[2].load(Ordering::Relaxed), count(&report, "59"));
    // A decline explains itself in field 48.
    let declined = rows_declined_example(&switch, &replay_data).await;
    assert!(declined.contains("decision=decline;score="), "{declined}");
    assert!(declined.contains(";reasons="), "{declined}");
    // The journal keeps each response's decision, score and model.
    let journal = switch.switch.journal().expect("journal on by default");
    let model_id = switch.switch.scoring.champion().unwrap().id().to_string();
    let mut responses = 0;
    payswitch::journal::scan(journal.dir(), false, |_, r| {
        if r.kind != payswitch::journal::RecordKind::Response {
            return;
        }
        responses += 1;
        assert_eq!(r.model, model_id);
        assert!(r.score.is_some_and(|s| (0.0..=1.0).contains(&s)), "{r:?}");
        let expected = if r.code == "59" {
            "decline"
        } else {
            r.decision.as_str()
        };
        assert_eq!(r.decision, expected);
        assert!(["approve", "review", "decline"].contains(&r.decision.as_str()));
    })
    .unwrap();
    assert!(responses as u64 >= report.answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_hot_deploys_under_load_fail_nothing_and_the_last_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let train_data = write_data(dir.path(), "train.csv", 20_000, 3);
    let replay_data = write_data(dir.path(), "replay.csv", 4_000, 4);
    let forest = train_model(&train_data, ModelKind::Forest, 10, 1);
    let logistic = train_model(&train_data, ModelKind::Logistic, 0, 1);
    let forest_path = dir.path().join("rf.pswm");
    std::fs::write(&forest_path, forest.to_bytes()).unwrap();

    let sim = acquirer_sim::start(SimConfig::default()).await.unwrap();
    let switch = start(&sim, scoring_with(&forest_path)).await;
    let admin = switch.admin_addr.unwrap();

    // Refused without the token, and a corrupt model is refused with the old one kept.
    let (status, _) = http(admin, "POST", "/api/models", None, &logistic.to_bytes());
    assert_eq!(status, 401);
    let mut corrupt = logistic.to_bytes();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let (status, text) = http(admin, "POST", "/api/models", Some(TOKEN), &corrupt);
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("model refused"), "{text}");

    let load = tokio::spawn(load::run(replay(
        &switch,
        &replay_data,
        1_000.0,
        Duration::from_secs(4),
    )));
    let models = [logistic.to_bytes(), forest.to_bytes()];
    let mut last_id = String::new();
    for i in 0..20 {
        let bytes = models[i % 2].clone();
        last_id = Model::load(&bytes).unwrap().id().to_owned();
        let (status, text) = tokio::task::spawn_blocking(move || {
            http(admin, "POST", "/api/models", Some(TOKEN), &bytes)
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{text}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let report = load.await.unwrap().unwrap();
    assert_eq!(report.errors, 0, "{}", report.render());
    assert_eq!(count(&report, "96"), 0, "{}", report.render());
    assert_eq!(count(&report, "91"), 0, "{}", report.render());
    assert_eq!(report.answered, report.sent);
    assert_eq!(switch.switch.scoring.champion().unwrap().id(), last_id);
    let (status, text) = http(admin, "GET", "/api/models", None, b"");
    assert_eq!(status, 200);
    assert!(text.contains(&last_id), "{text}");

    // A challenger deployed in shadow, then promoted: it decides from then on, and is no
    // longer a challenger.
    let challenger = models[0].clone(); // the last deploy (i = 19) was models[1]
    let challenger_id = Model::load(&challenger).unwrap().id().to_owned();
    assert_ne!(challenger_id, last_id);
    let (status, text) = http(
        admin,
        "POST",
        "/api/models?role=challenger",
        Some(TOKEN),
        &challenger,
    );
    assert_eq!(status, 200, "{text}");
    let promote = format!("/api/models/promote?id={challenger_id}");
    let (status, _) = http(admin, "POST", &promote, None, b"");
    assert_eq!(status, 401, "promotion needs the token");
    let (status, text) = http(admin, "POST", &promote, Some(TOKEN), b"");
    assert_eq!(status, 200, "{text}");
    let scoring = &switch.switch.scoring;
    assert_eq!(scoring.champion().unwrap().id(), challenger_id);
    assert!(scoring.challengers().is_empty());
}

#[test]
fn a_challenger_scores_in_shadow_and_changes_no_decision() {
    use payswitch::scoring::rules::RuleSet;
    use payswitch::scoring::{Scoring, ShardScoring};
    use payswitch_models::features::Transaction;

    let dir = tempfile::tempdir().unwrap();
    let train_data = write_data(dir.path(), "train.csv", 20_000, 5);
    let replay_data = write_data(dir.path(), "replay.csv", 5_000, 6);
    let champion = Arc::new(train_model(&train_data, ModelKind::Forest, 10, 1));
    let challenger = Arc::new(train_model(&train_data, ModelKind::Logistic, 0, 1));
    let rows =
        payswitch_models::data::read_all(std::fs::File::open(&replay_data).unwrap()).unwrap();

    // The same transactions, in the same order, through scoring with and without a
    // challenger: every verdict must be the same.
    let verdicts = |with_challenger: bool| {
        let rules = Arc::new(RuleSet::load(None, payswitch::scoring::rule_variables()).unwrap());
        let scoring = Scoring::new(
            rules,
            Duration::from_secs(1),
            EventTime::Transmission,
            10_000,
        );
        scoring.set_champion(Arc::clone(&champion)).unwrap();
        if with_challenger {
            scoring.add_challenger(Arc::clone(&challenger)).unwrap();
        }
        let mut shard = ShardScoring::new(10_000);
        let verdicts: Vec<_> = rows
            .iter()
            .map(|row| {
                let tx = Transaction::from_labeled(row).unwrap();
                let v = scoring.decide(&mut shard, &tx);
                (v.decision, v.score.map(f32::to_bits))
            })
            .collect();
        (
            verdicts,
            scoring.stats.challenger_scored.load(Ordering::Relaxed),
        )
    };
    let (alone, shadow_alone) = verdicts(false);
    let (with, shadow_with) = verdicts(true);
    assert_eq!(shadow_alone, 0);
    assert_eq!(
        shadow_with,
        rows.len() as u64,
        "the challenger scored every transaction"
    );
    assert_eq!(alone, with, "the champion alone decides");
    assert!(alone
        .iter()
        .any(|(d, _)| *d == payswitch_models::model::Decision::Decline));
}

#[test]
fn rules_override_the_model_and_add_to_its_score() {
    use payswitch::scoring::rules::RuleSet;
    use payswitch::scoring::{Scoring, ShardScoring};
    use payswitch_models::features::Transaction;

    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(
        &rules_path,
        "[[rule]]\nname = \"big\"\nwhen = \"amount_minor >= 20000\"\naction = \"decline\"\n\
         [[rule]]\nname = \"nudge\"\nwhen = \"amount_minor < 20000\"\naction = \"add_score\"\nadd = 0.25\n",
    )
    .unwrap();
    let train_data = write_data(dir.path(), "train.csv", 20_000, 7);
    let model = Arc::new(train_model(&train_data, ModelKind::Logistic, 0, 1));
    let rules =
        Arc::new(RuleSet::load(Some(&rules_path), payswitch::scoring::rule_variables()).unwrap());
    let scoring = Scoring::new(
        rules,
        Duration::from_secs(1),
        EventTime::Transmission,
        1_000,
    );
    scoring.set_champion(Arc::clone(&model)).unwrap();
    let plain = {
        let rules = Arc::new(RuleSet::load(None, payswitch::scoring::rule_variables()).unwrap());
        let s = Scoring::new(
            rules,
            Duration::from_secs(1),
            EventTime::Transmission,
            1_000,
        );
        s.set_champion(Arc::clone(&model)).unwrap();
        s
    };
    let rows = payswitch_models::data::read_all(std::fs::File::open(&train_data).unwrap()).unwrap();
    let (mut shard, mut plain_shard) = (ShardScoring::new(1_000), ShardScoring::new(1_000));
    let mut big = 0;
    for row in rows.iter().take(2_000) {
        let tx = Transaction::from_labeled(row).unwrap();
        big += usize::from(tx.amount_minor >= 20_000);
        let with_rules = scoring.decide(&mut shard, &tx);
        let without = plain.decide(&mut plain_shard, &tx);
        if tx.amount_minor >= 20_000 {
            assert_eq!(
                with_rules.decision,
                payswitch_models::model::Decision::Decline
            );
            assert_eq!(with_rules.rule.as_deref(), Some("big"));
            assert!(with_rules.tags().contains("rule=big"));
        } else {
            let expected = (without.score.unwrap() + 0.25).min(1.0);
            assert!((with_rules.score.unwrap() - expected).abs() < 1e-6);
            assert_eq!(with_rules.rule, None);
        }
    }
    assert!(big > 0, "the sample has amounts the decline rule matches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_directory_deploys_what_is_dropped_in_and_ignores_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let models_dir = dir.path().join("models");
    std::fs::create_dir(&models_dir).unwrap();
    let train_data = write_data(dir.path(), "train.csv", 20_000, 8);
    let forest = train_model(&train_data, ModelKind::Forest, 10, 1);
    let logistic = train_model(&train_data, ModelKind::Logistic, 0, 1);

    let sim = acquirer_sim::start(SimConfig::default()).await.unwrap();
    let switch = start(
        &sim,
        ScoringConfig {
            models_dir: Some(models_dir.clone()),
            ..ScoringConfig::default()
        },
    )
    .await;
    let scoring = &switch.switch.scoring;
    assert!(scoring.champion().is_none());

    // Written beside, renamed in: never read half written.
    let drop_in = |name: &str, bytes: &[u8]| {
        let staging = dir.path().join(format!("{name}.tmp"));
        std::fs::write(&staging, bytes).unwrap();
        std::fs::rename(&staging, models_dir.join(name)).unwrap();
    };
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "the watcher did not pick it up");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    drop_in("champion.pswm", &forest.to_bytes());
    wait_for(&|| scoring.champion().is_some_and(|m| m.id() == forest.id()));
    drop_in("challenger-lr.pswm", &logistic.to_bytes());
    wait_for(&|| {
        scoring
            .challengers()
            .iter()
            .any(|c| c.model.id() == logistic.id())
    });

    // A corrupt champion is refused: the one in force stays.
    let mut corrupt = logistic.to_bytes();
    corrupt[10] ^= 0xff;
    drop_in("champion.pswm", &corrupt);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(scoring.champion().unwrap().id(), forest.id());
}

#[test]
fn a_forest_trained_on_one_seed_reaches_auc_095_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let train_data = write_data(dir.path(), "train.csv", 60_000, 11);
    let test_data = write_data(dir.path(), "test.csv", 60_000, 12);
    let model = train_model(&train_data, ModelKind::Forest, 40, 1);
    let rows = payswitch_models::data::read_all(std::fs::File::open(&test_data).unwrap()).unwrap();
    let scored = train::score_all(&model, &train::replay(&rows));
    let metrics = payswitch_models::eval::evaluate(&scored, model.thresholds().decline);
    eprintln!(
        "out-of-sample AUC-ROC {:.4}, AUC-PR {:.4}",
        metrics.auc_roc, metrics.auc_pr
    );
    assert!(metrics.n_fraud > 100);
    assert!(metrics.auc_roc >= 0.95, "AUC-ROC {}", metrics.auc_roc);
    assert!(metrics.auc_pr > 0.5, "AUC-PR {}", metrics.auc_pr);
}

/// Field 48 of the first response declined 59 when the replay file's fraud rows are sent
/// one by one.
async fn rows_declined_example(switch: &RunningSwitch, data: &Path) -> String {
    use payswitch_protocol::{Message, Stan};
    let rows = payswitch_models::data::read_all(std::fs::File::open(data).unwrap()).unwrap();
    let endpoint =
        payswitch_net::quic::client_endpoint(ClientTrust::Roots(vec![switch.certificate.clone()]))
            .unwrap();
    let conn = payswitch_net::quic::connect(&endpoint, switch.quic_addr.unwrap(), "localhost")
        .await
        .unwrap();
    for (i, row) in rows.iter().filter(|r| r.is_fraud == 1).enumerate() {
        let stan = Stan::new(900_000 + i as u32).unwrap();
        let rrn = format!("TEST{:08}", i);
        let request =
            payswitch_loadtest::cards::labeled_authorization(row, stan, &rrn, "9912").unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        payswitch_net::framed::write_message(&mut send, &request, &mut bytes::BytesMut::new())
            .await
            .unwrap();
        send.finish().unwrap();
        let frame = payswitch_net::FrameReader::new(recv, 8192)
            .next_frame()
            .await
            .unwrap()
            .unwrap();
        let response = Message::decode(frame).unwrap();
        if response.get_str(39) == Some("59") {
            return response.get_str(48).unwrap().to_owned();
        }
    }
    panic!("no fraud row was declined");
}
