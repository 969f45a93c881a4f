//! `payswitch model train|eval|inspect|bench|deploy`: the thin I/O shell around
//! `payswitch_models` (which reads no file and no clock itself).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use payswitch_models::data;
use payswitch_models::eval;
use payswitch_models::features::{FeatureExtractor, Features, Transaction, FEATURE_COUNT};
use payswitch_models::model::{Model, ModelKind};
use payswitch_models::train::{self, Dataset, TrainOptions};

/// Calls timed per histogram sample: one call is ~100 ns to 1 µs, well above `Instant`'s
/// ~20 ns resolution, so each sample times a single call.
const CALLS_PER_SAMPLE: u32 = 1;
/// Samples per measurement: enough for a stable p99 in a second or two.
const BENCH_SAMPLES: usize = 200_000;
/// smartcore's predict is orders of magnitude slower: fewer samples keep the bench short.
const SMARTCORE_SAMPLES: usize = 5_000;

/// The `model` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Train a model from a labeled CSV and write a model file.
    Train {
        /// Labeled transactions (CSV).
        #[arg(long)]
        data: PathBuf,
        /// logistic or forest.
        #[arg(long, value_parser = parse_kind, default_value = "forest")]
        kind: ModelKind,
        /// Model file to write.
        #[arg(long)]
        out: PathBuf,
        /// Trees (forest).
        #[arg(long, default_value_t = 100)]
        trees: u16,
        /// Max tree depth (forest).
        #[arg(long, default_value_t = 8)]
        depth: u16,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Evaluate a model on a labeled CSV.
    Eval {
        /// Labeled transactions (CSV).
        #[arg(long)]
        data: PathBuf,
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show a model file's kind, thresholds, schema and training metadata.
    Inspect {
        /// Model file.
        model: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Single-row scoring latency; for a forest also smartcore's predict (needs --data to
    /// refit the same forest).
    Bench {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Labeled transactions to draw rows from (and to refit smartcore's forest).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deploy a model to a running switch through its admin API: validated (schema,
    /// checksum, cost) and swapped in atomically, with no request failing or waiting.
    Deploy {
        /// Model file.
        model: PathBuf,
        /// The switch's admin address (host:port).
        #[arg(long)]
        admin: String,
        /// Deploy as a challenger (scored in shadow) instead of the champion.
        #[arg(long)]
        challenger: bool,
        /// Admin bearer token (default: $PAYSWITCH_ADMIN_TOKEN).
        #[arg(long, env = "PAYSWITCH_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
    },
}

/// Time to wait for the switch to validate and swap a model.
const DEPLOY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn parse_kind(s: &str) -> Result<ModelKind, String> {
    match s {
        "logistic" => Ok(ModelKind::Logistic),
        "forest" => Ok(ModelKind::Forest),
        _ => Err(format!("unknown kind `{s}` (logistic or forest)")),
    }
}

/// Runs a `model` subcommand.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Train {
            data,
            kind,
            out,
            trees,
            depth,
            seed,
        } => {
            let options = TrainOptions {
                kind,
                trees,
                depth,
                seed,
                created: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                ..TrainOptions::default()
            };
            run_train(&data, &options, &out)
        }
        ModelCommand::Eval { data, model, json } => run_eval(&data, &model, json),
        ModelCommand::Inspect { model, json } => run_inspect(&model, json),
        ModelCommand::Bench { model, data, json } => run_bench(&model, data.as_deref(), json),
        ModelCommand::Deploy {
            model,
            admin,
            challenger,
            token,
        } => run_deploy(&model, &admin, challenger, &token),
    }
}

fn run_deploy(path: &Path, admin: &str, challenger: bool, token: &str) -> anyhow::Result<()> {
    // Checked here too, so a broken file is reported before it travels.
    let model = load_model(path)?;
    let role = if challenger { "challenger" } else { "champion" };
    let url = format!("http://{admin}/api/models?role={role}");
    let response = ureq::post(&url)
        .timeout(DEPLOY_TIMEOUT)
        .set("Authorization", &format!("Bearer {token}"))
        .send_bytes(&model.to_bytes());
    match response {
        Ok(_) => {
            println!("deployed {} as {role} on {admin}", model.id());
            Ok(())
        }
        Err(ureq::Error::Status(code, response)) => {
            let text = response.into_string().unwrap_or_default();
            anyhow::bail!("the switch refused the model ({code}): {}", text.trim())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("reaching the admin API at {admin}"))),
    }
}

fn read_rows(path: &Path) -> anyhow::Result<Vec<data::LabeledTransaction>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    data::read_all(std::io::BufReader::new(file))
        .with_context(|| format!("reading {}", path.display()))
}

fn load_model(path: &Path) -> anyhow::Result<Model> {
    Model::load_file(path).with_context(|| format!("loading model {}", path.display()))
}

fn run_train(data: &Path, options: &TrainOptions, out: &Path) -> anyhow::Result<()> {
    let rows = read_rows(data)?;
    let model = train::train(&rows, options)?;
    std::fs::write(out, model.to_bytes()).with_context(|| format!("writing {}", out.display()))?;
    let m = &model.metadata().train_metrics;
    println!(
        "model {} ({}) written to {}: {} rows, {} fraud; train AUC-ROC {:.4}, AUC-PR {:.4}; review >= {:.4}, decline >= {:.4}",
        model.id(),
        model.kind().name(),
        out.display(),
        m.n,
        m.n_fraud,
        m.auc_roc,
        m.auc_pr,
        model.thresholds().review,
        model.thresholds().decline
    );
    Ok(())
}

fn run_eval(data: &Path, model: &Path, json: bool) -> anyhow::Result<()> {
    let model = load_model(model)?;
    let dataset = train::replay(&read_rows(data)?);
    let metrics = eval::evaluate(
        &train::score_all(&model, &dataset),
        model.thresholds().decline,
    );
    if json {
        let mut value = serde_json::to_value(&metrics)?;
        value["model"] = model.id().into();
        println!("{value}");
    } else {
        println!(
            "model {}: n {} fraud {}; AUC-ROC {:.4}; AUC-PR {:.4}; recall@FPR {:?}; fraud amount caught {} of {} (minor units); legit declined {}",
            model.id(), metrics.n, metrics.n_fraud, metrics.auc_roc, metrics.auc_pr,
            metrics.recall_at_fpr, metrics.fraud_amount_caught_minor, metrics.fraud_amount_minor,
            metrics.legit_declined
        );
    }
    Ok(())
}

fn run_inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let model = load_model(path)?;
    let value = serde_json::json!({
        "id": model.id(),
        "kind": model.kind().name(),
        "schema_version": payswitch_models::features::SCHEMA_VERSION,
        "features": payswitch_models::features::FEATURE_NAMES,
        "thresholds": model.thresholds(),
        "trees": model.trees(),
        "depth": model.depth(),
        "max_cost": model.max_cost(),
        "checksum": format!("{:08x}", model.checksum()),
        "metadata": model.metadata(),
    });
    if json {
        println!("{value}");
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

/// Rows to bench on: from `--data`, or a synthetic spread of transactions.
fn bench_transactions(data: Option<&[data::LabeledTransaction]>) -> Vec<Transaction> {
    if let Some(rows) = data {
        let mut txs: Vec<Transaction> = rows.iter().filter_map(Transaction::from_labeled).collect();
        txs.sort_by_key(|t| t.timestamp_ms);
        if !txs.is_empty() {
            return txs;
        }
    }
    (0..10_000u64)
        .map(|i| Transaction {
            timestamp_ms: 1_700_000_000_000 + i as i64 * 1_000,
            card: i % 997,
            amount_minor: 100 + (i * 7919) % 50_000,
            currency: 978,
            mcc: [5411, 5999, 4829, 5812][(i % 4) as usize],
            merchant: i % 101,
            terminal: i % 211,
            country: [276, 840][(i % 2) as usize],
            pos_entry_mode: [51, 10][(i % 2) as usize],
        })
        .collect()
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits up to 10 s in ns: plenty for single calls.
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("constant bounds are valid")
}

fn time_ns<F: FnMut(usize)>(samples: usize, mut call: F) -> Histogram<u64> {
    let mut h = histogram();
    for i in 0..samples {
        let start = Instant::now();
        for _ in 0..CALLS_PER_SAMPLE {
            call(i);
        }
        let ns = start.elapsed().as_nanos() as u64 / u64::from(CALLS_PER_SAMPLE);
        let _ = h.record(ns.max(1));
    }
    h
}

fn run_bench(path: &Path, data: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let model = load_model(path)?;
    let rows = data.map(read_rows).transpose()?;
    let txs = bench_transactions(rows.as_deref());
    let mut extractor = FeatureExtractor::default();
    let features: Vec<Features> = txs
        .iter()
        .map(|tx| {
            let mut x = [0f32; FEATURE_COUNT];
            extractor.extract(tx, &mut x);
            x
        })
        .collect();
    let mut sink = 0f32;
    let score = time_ns(BENCH_SAMPLES, |i| {
        sink += model.score(std::hint::black_box(&features[i % features.len()]))
    });
    let mut extractor = FeatureExtractor::default();
    let mut x = [0f32; FEATURE_COUNT];
    let with_features = time_ns(BENCH_SAMPLES, |i| {
        // Time moves on across passes so windows see fresh events, as in traffic.
        let mut tx = txs[i % txs.len()];
        tx.timestamp_ms += (i / txs.len()) as i64 * 86_400_000;
        extractor.extract(&tx, &mut x);
        sink += model.score(&x);
    });
    std::hint::black_box(sink);
    let mut out = serde_json::json!({
        "model": model.id(),
        "kind": model.kind().name(),
        "samples": BENCH_SAMPLES,
        "score_p50_ns": score.value_at_quantile(0.5),
        "score_p99_ns": score.value_at_quantile(0.99),
        "score_mean_ns": score.mean(),
        "with_features_p50_ns": with_features.value_at_quantile(0.5),
        "with_features_p99_ns": with_features.value_at_quantile(0.99),
    });
    if model.kind() == ModelKind::Forest {
        out["trees"] = model.trees().into();
        out["depth"] = model.depth().into();
        if let Some(rows) = rows.as_deref() {
            bench_smartcore(&model, rows, &mut out)?;
        } else {
            out["smartcore_note"] =
                "pass --data (the training file) to refit and time smartcore's forest".into();
        }
    }
    if json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Refits smartcore's forest from the training file with the model's own parameters (same
/// rows, same seed: the same forest) and times its `predict` on one-row matrices.
fn bench_smartcore(
    model: &Model,
    rows: &[data::LabeledTransaction],
    out: &mut serde_json::Value,
) -> anyhow::Result<()> {
    use smartcore_bridge::*;
    let meta = model.metadata();
    let options = TrainOptions {
        kind: ModelKind::Forest,
        trees: u16::try_from(meta.trees).unwrap_or(100),
        depth: u16::try_from(meta.max_depth).unwrap_or(8),
        seed: meta.seed,
        ..TrainOptions::default()
    };
    let dataset: Dataset = train::replay(rows);
    let fit = train::fit_rows(&dataset, options.seed);
    let forest = train::fit_smartcore_forest(&dataset, &fit, &options)?;
    let same = train::export_forest(&forest, &dataset, &fit)
        .map(|p| payswitch_models::model::Params::Forest(p) == *model.params())
        .unwrap_or(false);
    let matrices = one_row_matrices(&dataset.features[..dataset.features.len().min(1000)])?;
    let h = time_ns(SMARTCORE_SAMPLES, |i| {
        let _ = std::hint::black_box(forest.predict(&matrices[i % matrices.len()]));
    });
    out["smartcore_p50_ns"] = h.value_at_quantile(0.5).into();
    out["smartcore_p99_ns"] = h.value_at_quantile(0.99).into();
    out["smartcore_same_forest"] = same.into();
    let ours = out["score_p50_ns"].as_u64().unwrap_or(1).max(1);
    out["speedup_p50"] = (h.value_at_quantile(0.5) as f64 / ours as f64).into();
    Ok(())
}

mod smartcore_bridge {
    use payswitch_models::features::{Features, FEATURE_COUNT};
    use smartcore::linalg::basic::matrix::DenseMatrix;

    pub fn one_row_matrices(rows: &[Features]) -> anyhow::Result<Vec<DenseMatrix<f32>>> {
        rows.iter()
            .map(|x| {
                DenseMatrix::new(1, FEATURE_COUNT, x.to_vec(), false)
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .collect()
    }
}
