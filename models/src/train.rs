//! Training: replay labeled rows in time order through the [`FeatureExtractor`], fit with
//! smartcore, export the fitted parameters into a payswitch [`Model`].
//!
//! What smartcore 0.7 exposes: `LogisticRegression::coefficients()` and `intercept()` are
//! public. A forest's trees and a tree's nodes are private fields with no accessor, and a
//! tree's leaves keep only the majority class (no counts, no probabilities). With the
//! crate's `serde` feature both derive `Serialize`, so we serialize the fitted forest to a
//! `serde_json::Value` in memory and read each node's split feature, split value and
//! children from it (schema pinned to smartcore 0.7 and checked: a missing field is an
//! error, never a guess). Leaf and inner-node fraud probabilities are then estimated by us,
//! by passing the fit rows down each exported tree: smartcore's structure, our calibration.
//!
//! Class imbalance: legitimate rows are subsampled to [`LEGIT_PER_FRAUD`] per fraud row
//! before fitting (smartcore's forest takes no sample weights); thresholds are chosen on
//! all rows, so the subsampling shifts no threshold.

use serde::Deserialize;
use smartcore::ensemble::random_forest_classifier::{
    RandomForestClassifier, RandomForestClassifierParameters,
};
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::logistic_regression::{LogisticRegression, LogisticRegressionParameters};
use thiserror::Error;

use crate::data::LabeledTransaction;
use crate::eval::{self, Scored};
use crate::features::{FeatureExtractor, Features, Transaction, FEATURE_COUNT};
use crate::model::{
    ForestParams, LogisticParams, Metadata, Model, ModelError, ModelKind, Params, Thresholds, LEAF,
};

/// Legitimate rows kept per fraud row for fitting: enough negatives to learn the normal,
/// few enough that fraud is not drowned (≈ 5 % fraud instead of 0.5 %).
pub const LEGIT_PER_FRAUD: usize = 20;

/// The smartcore forest type we fit, kept public so the bench can time its `predict`.
pub type SmartcoreForest = RandomForestClassifier<f32, u32, DenseMatrix<f32>, Vec<u32>>;

/// Errors training.
#[derive(Debug, Error)]
pub enum TrainError {
    /// Too little data.
    #[error("training data needs fraud and legitimate rows (found {fraud} fraud of {rows})")]
    Data {
        /// Rows.
        rows: usize,
        /// Fraud rows.
        fraud: usize,
    },
    /// smartcore failed.
    #[error("smartcore: {0}")]
    Smartcore(String),
    /// The fitted forest did not read as expected.
    #[error("exporting the smartcore forest: {0}")]
    Export(String),
    /// The exported model did not validate.
    #[error("{0}")]
    Model(#[from] ModelError),
}

/// Training options.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Which algorithm.
    pub kind: ModelKind,
    /// Trees (forest).
    pub trees: u16,
    /// Max depth (forest).
    pub depth: u16,
    /// Seed for subsampling and the forest.
    pub seed: u64,
    /// Review at this false-positive rate on the training data.
    pub review_fpr: f64,
    /// Decline at this false-positive rate.
    pub decline_fpr: f64,
    /// Creation time to record (the caller reads the clock).
    pub created: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            kind: ModelKind::Forest,
            trees: 100,
            depth: 8,
            seed: 1,
            review_fpr: 0.02,
            decline_fpr: 0.005,
            created: String::new(),
        }
    }
}

/// Features, labels and amounts of a labeled file, replayed in time order.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// One feature vector per row.
    pub features: Vec<Features>,
    /// True when fraud.
    pub labels: Vec<bool>,
    /// Amounts in minor units.
    pub amounts: Vec<u64>,
}

/// Replays `rows` (sorted by time here, stable) through a fresh extractor.
pub fn replay(rows: &[LabeledTransaction]) -> Dataset {
    let mut txs: Vec<(Transaction, bool)> = rows
        .iter()
        .filter_map(|r| Some((Transaction::from_labeled(r)?, r.is_fraud == 1)))
        .collect();
    txs.sort_by_key(|(t, _)| t.timestamp_ms);
    let mut extractor = FeatureExtractor::default();
    let mut data = Dataset::default();
    for (tx, fraud) in txs {
        let mut x = [0f32; FEATURE_COUNT];
        extractor.extract(&tx, &mut x);
        data.features.push(x);
        data.labels.push(fraud);
        data.amounts.push(tx.amount_minor);
    }
    data
}

/// Scores every row of `data` with `model`.
pub fn score_all(model: &Model, data: &Dataset) -> Vec<Scored> {
    data.features
        .iter()
        .zip(&data.labels)
        .zip(&data.amounts)
        .map(|((x, &is_fraud), &amount_minor)| Scored {
            score: model.score(x),
            is_fraud,
            amount_minor,
        })
        .collect()
}

/// Rows to fit on: every fraud row, and legitimate rows by a seeded stride-free sample.
pub fn fit_rows(data: &Dataset, seed: u64) -> Vec<usize> {
    let fraud = data.labels.iter().filter(|&&f| f).count();
    let legit = data.labels.len() - fraud;
    let keep = (fraud * LEGIT_PER_FRAUD).min(legit) as u64;
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..data.labels.len())
        .filter(|&i| {
            // splitmix64: a deterministic coin per row.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            data.labels[i] || (z % legit.max(1) as u64) < keep
        })
        .collect()
}

fn matrix(data: &Dataset, rows: &[usize]) -> Result<DenseMatrix<f32>, TrainError> {
    let values: Vec<f32> = rows.iter().flat_map(|&i| data.features[i]).collect();
    DenseMatrix::new(rows.len(), FEATURE_COUNT, values, false)
        .map_err(|e| TrainError::Smartcore(e.to_string()))
}

/// Fits smartcore's forest on the subsampled rows.
pub fn fit_smartcore_forest(
    data: &Dataset,
    rows: &[usize],
    options: &TrainOptions,
) -> Result<SmartcoreForest, TrainError> {
    let x = matrix(data, rows)?;
    let y: Vec<u32> = rows.iter().map(|&i| u32::from(data.labels[i])).collect();
    let params = RandomForestClassifierParameters::default()
        .with_n_trees(options.trees)
        .with_max_depth(options.depth)
        .with_seed(options.seed);
    RandomForestClassifier::fit(&x, &y, params).map_err(|e| TrainError::Smartcore(e.to_string()))
}

/// Trains a model on labeled rows.
pub fn train(rows: &[LabeledTransaction], options: &TrainOptions) -> Result<Model, TrainError> {
    let data = replay(rows);
    train_on(&data, options)
}

/// Trains a model on replayed data.
pub fn train_on(data: &Dataset, options: &TrainOptions) -> Result<Model, TrainError> {
    let fraud = data.labels.iter().filter(|&&f| f).count();
    if fraud == 0 || fraud == data.labels.len() {
        return Err(TrainError::Data {
            rows: data.labels.len(),
            fraud,
        });
    }
    let rows = fit_rows(data, options.seed);
    let mut notes = Vec::new();
    let params = match options.kind {
        ModelKind::Logistic => Params::Logistic(fit_logistic(data, &rows)?),
        ModelKind::Forest => {
            let forest = fit_smartcore_forest(data, &rows, options)?;
            let parity = export_parity(&forest, data, &rows)?;
            notes.push(format!("smartcore_predict_parity={parity:.6}"));
            Params::Forest(export_forest(&forest, data, &rows)?)
        }
    };
    let mut metadata = Metadata {
        created: options.created.clone(),
        trainer: "payswitch-models (smartcore 0.7)".into(),
        rows: data.labels.len() as u64,
        fraud_rows: fraud as u64,
        fit_rows: rows.len() as u64,
        seed: options.seed,
        review_fpr: options.review_fpr,
        decline_fpr: options.decline_fpr,
        notes,
        ..Metadata::default()
    };
    if options.kind == ModelKind::Forest {
        metadata.trees = u32::from(options.trees);
        metadata.max_depth = u32::from(options.depth);
    }
    // Score once with provisional thresholds, then choose them from legitimate scores.
    let provisional = Thresholds {
        review: 1.0,
        decline: 1.0,
    };
    let model = Model::new(params.clone(), provisional, metadata.clone())?;
    let scored = score_all(&model, data);
    let legit: Vec<f32> = scored
        .iter()
        .filter(|s| !s.is_fraud)
        .map(|s| s.score)
        .collect();
    let decline = eval::threshold_for_fpr(&legit, options.decline_fpr);
    let review = eval::threshold_for_fpr(&legit, options.review_fpr).min(decline);
    metadata.train_metrics = eval::evaluate(&scored, decline);
    Ok(Model::new(
        params,
        Thresholds { review, decline },
        metadata,
    )?)
}

fn fit_logistic(data: &Dataset, rows: &[usize]) -> Result<LogisticParams, TrainError> {
    let (mean, std) = standardization(data, rows);
    let values: Vec<f64> = rows
        .iter()
        .flat_map(|&i| {
            (0..FEATURE_COUNT).map(move |f| f64::from((data.features[i][f] - mean[f]) / std[f]))
        })
        .collect();
    let x = DenseMatrix::new(rows.len(), FEATURE_COUNT, values, false)
        .map_err(|e| TrainError::Smartcore(e.to_string()))?;
    let y: Vec<u32> = rows.iter().map(|&i| u32::from(data.labels[i])).collect();
    let params = LogisticRegressionParameters::default().with_alpha(1.0);
    let lr = LogisticRegression::fit(&x, &y, params)
        .map_err(|e| TrainError::Smartcore(e.to_string()))?;
    use smartcore::linalg::basic::arrays::Array;
    let mut weights = [0f32; FEATURE_COUNT];
    for (f, w) in weights.iter_mut().enumerate() {
        *w = *lr.coefficients().get((0, f)) as f32;
    }
    let bias = *lr.intercept().get((0, 0)) as f32;
    Ok(LogisticParams {
        bias,
        weights,
        mean,
        std,
    })
}

fn standardization(data: &Dataset, rows: &[usize]) -> ([f32; FEATURE_COUNT], [f32; FEATURE_COUNT]) {
    let n = rows.len().max(1) as f64;
    let mut mean = [0f32; FEATURE_COUNT];
    let mut std = [1f32; FEATURE_COUNT];
    for f in 0..FEATURE_COUNT {
        let m = rows
            .iter()
            .map(|&i| f64::from(data.features[i][f]))
            .sum::<f64>()
            / n;
        let var = rows
            .iter()
            .map(|&i| (f64::from(data.features[i][f]) - m).powi(2))
            .sum::<f64>()
            / n;
        mean[f] = m as f32;
        // A constant feature keeps std 1: it then contributes nothing, without dividing by 0.
        std[f] = if var > 1e-12 { var.sqrt() as f32 } else { 1.0 };
    }
    (mean, std)
}

/// smartcore 0.7's serialized node, the fields we need.
#[derive(Deserialize)]
struct SmartcoreNode {
    output: usize,
    split_feature: usize,
    split_value: Option<f64>,
    true_child: Option<usize>,
    false_child: Option<usize>,
}

#[derive(Deserialize)]
struct SmartcoreTree {
    nodes: Vec<SmartcoreNode>,
    classes: Vec<u32>,
}

#[derive(Deserialize)]
struct SmartcoreForestSer {
    trees: Option<Vec<SmartcoreTree>>,
}

/// The fitted forest's trees, read through its `Serialize`.
fn smartcore_trees(forest: &SmartcoreForest) -> Result<Vec<SmartcoreTree>, TrainError> {
    let value = serde_json::to_value(forest).map_err(|e| TrainError::Export(e.to_string()))?;
    let ser: SmartcoreForestSer =
        serde_json::from_value(value).map_err(|e| TrainError::Export(e.to_string()))?;
    ser.trees
        .ok_or_else(|| TrainError::Export("forest has no trees".into()))
}

/// Exports the forest into flat arrays (pre-order per tree, children after parents), then
/// sets each node's value to the fraud rate of the fit rows reaching it.
pub fn export_forest(
    forest: &SmartcoreForest,
    data: &Dataset,
    rows: &[usize],
) -> Result<ForestParams, TrainError> {
    let mut p = export_structure(forest)?;
    calibrate(&mut p, data, rows);
    Ok(p)
}

/// The forest's splits and smartcore's leaf classes as flat arrays, before calibration.
fn export_structure(forest: &SmartcoreForest) -> Result<ForestParams, TrainError> {
    let mut p = ForestParams {
        feature: vec![],
        threshold: vec![],
        left: vec![],
        right: vec![],
        value: vec![],
        roots: vec![],
    };
    for tree in smartcore_trees(forest)? {
        p.roots.push(p.feature.len() as u32);
        export_tree(&tree, &mut p)?;
    }
    Ok(p)
}

fn export_tree(tree: &SmartcoreTree, p: &mut ForestParams) -> Result<(), TrainError> {
    // Iterative pre-order: (smartcore node, our index to patch in the parent, is_left).
    let mut stack: Vec<(usize, Option<(usize, bool)>)> = vec![(0, None)];
    while let Some((node, parent)) = stack.pop() {
        let n = tree
            .nodes
            .get(node)
            .ok_or_else(|| TrainError::Export(format!("node {node} missing")))?;
        let at = p.feature.len();
        if let Some((parent, is_left)) = parent {
            if is_left {
                p.left[parent] = at as u32
            } else {
                p.right[parent] = at as u32
            }
        }
        let leaf_value = tree.classes.get(n.output).map_or(0.0, |&c| c as f32);
        match (n.true_child, n.false_child, n.split_value) {
            (Some(t), Some(f), Some(v)) if n.split_feature < FEATURE_COUNT => {
                p.feature.push(n.split_feature as u16);
                p.threshold.push(f32_at_or_below(v));
                stack.push((f, Some((at, false))));
                stack.push((t, Some((at, true))));
            }
            (None, None, _) => {
                p.feature.push(LEAF);
                p.threshold.push(0.0);
            }
            _ => return Err(TrainError::Export(format!("node {node} is half a split"))),
        }
        p.left.push(0);
        p.right.push(0);
        p.value.push(leaf_value);
    }
    Ok(())
}

/// The largest f32 not above `v`: smartcore compares an f32 feature widened to f64 with an
/// f64 split, and `x <= v` holds for f32 `x` exactly when `x <= f32_at_or_below(v)`.
fn f32_at_or_below(v: f64) -> f32 {
    let t = v as f32;
    if f64::from(t) > v {
        let bits = t.to_bits();
        let down = if t > 0.0 {
            bits - 1
        } else if t == 0.0 {
            0x8000_0001
        } else {
            bits + 1
        };
        f32::from_bits(down)
    } else {
        t
    }
}

/// Node value = (fraud + 1) / (rows + 2) of the fit rows reaching it: Laplace smoothing so a
/// leaf with two rows does not say 0 or 1.
fn calibrate(p: &mut ForestParams, data: &Dataset, rows: &[usize]) {
    let mut fraud = vec![0u32; p.feature.len()];
    let mut seen = vec![0u32; p.feature.len()];
    for &r in rows {
        let x = &data.features[r];
        for &root in &p.roots {
            let mut i = root as usize;
            loop {
                seen[i] += 1;
                fraud[i] += u32::from(data.labels[r]);
                if p.feature[i] == LEAF {
                    break;
                }
                let left = x[usize::from(p.feature[i])] <= p.threshold[i];
                i = if left { p.left[i] } else { p.right[i] } as usize;
            }
        }
    }
    for i in 0..p.value.len() {
        p.value[i] = (fraud[i] as f32 + 1.0) / (seen[i] as f32 + 2.0);
    }
}

/// Fraction of rows where the exported forest's majority vote (with smartcore's leaf
/// classes) equals smartcore's own `predict`: 1.0 when the export is faithful.
pub fn export_parity(
    forest: &SmartcoreForest,
    data: &Dataset,
    rows: &[usize],
) -> Result<f64, TrainError> {
    let p = export_structure(forest)?;
    let x = matrix(data, rows)?;
    let predicted = forest
        .predict(&x)
        .map_err(|e| TrainError::Smartcore(e.to_string()))?;
    let agree = rows
        .iter()
        .zip(&predicted)
        .filter(|&(&r, &y)| {
            let votes: usize = p
                .roots
                .iter()
                .map(|&root| {
                    let mut i = root as usize;
                    while p.feature[i] != LEAF {
                        let left = data.features[r][usize::from(p.feature[i])] <= p.threshold[i];
                        i = if left { p.left[i] } else { p.right[i] } as usize;
                    }
                    usize::from(p.value[i] >= 0.5)
                })
                .sum();
            // smartcore breaks a tie towards the first class (legitimate).
            u32::from(2 * votes > p.roots.len()) == y
        })
        .count();
    Ok(agree as f64 / rows.len().max(1) as f64)
}
