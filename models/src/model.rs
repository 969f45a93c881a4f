//! payswitch's model file and its evaluator.
//!
//! File layout, little-endian:
//! `"PSWM" | format_version u16 | kind u8 | 0u8 | body_len u32 | body | crc32c u32`,
//! the CRC-32C over everything before it. The body: `schema_version u32 | feature_count u16 |
//! names (u8 len + bytes each) | review f32 | decline f32 | metadata_len u32 | metadata JSON |
//! parameters`. Logistic parameters: `bias f32 | weights | means | stds` (feature_count f32
//! each). Forest parameters: `trees u32 | nodes u32 | roots (u32 each) | nodes`, a node being
//! `feature u16 (LEAF for a leaf) | threshold f32 | left u32 | right u32 | value f32`; a
//! sample goes left when `x[feature] <= threshold`; children come after their parent, so a
//! file cannot describe a cycle. `value` is the fraud probability at every node (leaves
//! score, inner nodes serve the reason codes).
//!
//! Loading checks every byte before trusting it; scoring allocates nothing. The forest is
//! evaluated in blocks of [`TREE_BLOCK`] trees walked in lock step for a fixed number of
//! steps (leaves loop to themselves), so the walk has no data-dependent branch and the
//! trees' loads overlap.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::features::{Features, FEATURE_COUNT, FEATURE_NAMES, SCHEMA_VERSION};
use crc32c::crc32c;

/// First bytes of every model file.
pub const MAGIC: [u8; 4] = *b"PSWM";
/// Version of the layout above.
pub const FORMAT_VERSION: u16 = 1;
/// `feature` of a leaf in the file.
pub const LEAF: u16 = u16::MAX;
/// Largest model file accepted: far above 1000 trees × depth 12 (≈ 150 MiB would be absurd
/// for an in-line model), it keeps a hostile length from allocating without end.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Most trees accepted.
pub const MAX_TREES: usize = 4096;
/// Deepest tree accepted: deeper trees do not fit a microsecond budget.
pub const MAX_DEPTH: usize = 32;
/// Trees walked in lock step: 8 independent load chains keep a core's load ports busy.
pub const TREE_BLOCK: usize = 8;

const HEADER_BYTES: usize = 12;

/// Errors loading a model file.
#[derive(Debug, Error)]
pub enum ModelError {
    /// Not a payswitch model file.
    #[error("not a payswitch model file (bad magic)")]
    Magic,
    /// Written by a newer or older payswitch.
    #[error("model file format version {0} is not supported (expected {FORMAT_VERSION})")]
    FormatVersion(u16),
    /// The file ends early or has bytes past its end.
    #[error("model file is truncated or has trailing bytes")]
    Truncated,
    /// The checksum does not match: the file is corrupt.
    #[error("model file checksum mismatch (stored {stored:08x}, computed {computed:08x}): the file is corrupt")]
    Checksum {
        /// In the file.
        stored: u32,
        /// Over the bytes read.
        computed: u32,
    },
    /// Trained on another feature schema.
    #[error("model feature schema {found} ({found_count} features) does not match this build's schema {SCHEMA_VERSION} ({FEATURE_COUNT} features)")]
    Schema {
        /// Version in the file.
        found: u32,
        /// Feature count in the file.
        found_count: u16,
    },
    /// Something inside is out of range.
    #[error("model file is invalid: {0}")]
    Invalid(String),
    /// Reading the file failed.
    #[error("reading model file: {0}")]
    Io(#[from] std::io::Error),
}

/// Which algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Logistic regression over standardized features.
    Logistic,
    /// Random forest, mean of leaf fraud probabilities.
    Forest,
}

impl ModelKind {
    fn code(self) -> u8 {
        match self {
            ModelKind::Logistic => 1,
            ModelKind::Forest => 2,
        }
    }

    /// Short name, also the model id's prefix.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Logistic => "logistic",
            ModelKind::Forest => "forest",
        }
    }
}

/// Score thresholds: `score >= decline` declines (59), `>= review` reviews, else approve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Review at or above.
    pub review: f32,
    /// Decline at or above.
    pub decline: f32,
}

/// What the model says about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Approve,
    /// Let it through, flag for a human.
    Review,
    /// Decline (response code 59).
    Decline,
}

/// Training summary stored in the file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metadata {
    /// When trained, as the trainer's caller gave it (RFC 3339).
    pub created: String,
    /// What trained it.
    pub trainer: String,
    /// Labeled rows replayed.
    pub rows: u64,
    /// Fraud rows among them.
    pub fraud_rows: u64,
    /// Rows the model was fit on after subsampling legitimate ones.
    pub fit_rows: u64,
    /// Trees (forest).
    pub trees: u32,
    /// Maximum depth asked for (forest).
    pub max_depth: u32,
    /// Seed.
    pub seed: u64,
    /// Target false-positive rates the thresholds were chosen for.
    pub review_fpr: f64,
    /// See `review_fpr`.
    pub decline_fpr: f64,
    /// Metrics on the training data.
    pub train_metrics: crate::eval::Metrics,
    /// Anything else worth keeping.
    pub notes: Vec<String>,
}

/// Forest parameters in flat arrays, as in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ForestParams {
    /// Split feature per node, [`LEAF`] for a leaf.
    pub feature: Vec<u16>,
    /// Split threshold: left when `x <= threshold`.
    pub threshold: Vec<f32>,
    /// Left child.
    pub left: Vec<u32>,
    /// Right child.
    pub right: Vec<u32>,
    /// Fraud probability at the node.
    pub value: Vec<f32>,
    /// Root node of each tree.
    pub roots: Vec<u32>,
}

/// Logistic parameters: `p = σ(bias + Σ w·(x − mean)/std)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogisticParams {
    /// Intercept.
    pub bias: f32,
    /// Coefficients on standardized features.
    pub weights: [f32; FEATURE_COUNT],
    /// Feature means.
    pub mean: [f32; FEATURE_COUNT],
    /// Feature standard deviations (> 0).
    pub std: [f32; FEATURE_COUNT],
}

/// Parameters of either kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Params {
    /// Logistic regression.
    Logistic(LogisticParams),
    /// Random forest.
    Forest(ForestParams),
}

/// The evaluator's forest: leaves loop to themselves, trees grouped in blocks with the
/// number of steps that reaches every leaf of the block.
#[derive(Clone, Debug)]
struct FlatForest {
    /// The walk's view of the nodes: one 16-byte record each, so a step touches one cache
    /// line instead of four arrays.
    nodes: Vec<Node>,
    feature: Vec<u16>,
    threshold: Vec<f32>,
    left: Vec<u32>,
    right: Vec<u32>,
    value: Vec<f32>,
    roots: Vec<u32>,
    block_steps: Vec<u32>,
    max_depth: u32,
}

/// One node as the walk reads it: split feature and threshold, children `[left, right]`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Node {
    threshold: f32,
    feature: u32,
    child: [u32; 2],
}

/// A loaded, validated model.
#[derive(Clone, Debug)]
pub struct Model {
    params: Params,
    thresholds: Thresholds,
    metadata: Metadata,
    id: String,
    checksum: u32,
    /// The file as loaded: re-encoding could differ in the last digit of a metadata float,
    /// and the id must name these exact bytes.
    bytes: Vec<u8>,
    /// Logistic, folded: `bias' + Σ w'·x`.
    folded: Option<([f32; FEATURE_COUNT], f32)>,
    forest: Option<FlatForest>,
}

impl Model {
    /// A model from freshly trained parameters (validated as if loaded from a file).
    pub fn new(
        params: Params,
        thresholds: Thresholds,
        metadata: Metadata,
    ) -> Result<Model, ModelError> {
        let bytes = encode(&params, thresholds, &metadata);
        Model::load(&bytes)
    }

    /// Parses and validates a model file.
    pub fn load(bytes: &[u8]) -> Result<Model, ModelError> {
        let body = check_envelope(bytes)?;
        let kind = bytes[6];
        let mut r = Reader { bytes: body, at: 0 };
        let (thresholds, metadata) = read_preamble(&mut r)?;
        let params = match kind {
            1 => Params::Logistic(read_logistic(&mut r)?),
            2 => Params::Forest(read_forest(&mut r)?),
            k => return Err(ModelError::Invalid(format!("unknown model kind {k}"))),
        };
        if r.at != body.len() {
            return Err(ModelError::Truncated);
        }
        let checksum = crc32c(&bytes[..bytes.len() - 4]);
        let mut model = Model::assemble(params, thresholds, metadata, checksum);
        model.bytes = bytes.to_vec();
        Ok(model)
    }

    fn assemble(
        params: Params,
        thresholds: Thresholds,
        metadata: Metadata,
        checksum: u32,
    ) -> Model {
        let (folded, forest, prefix) = match &params {
            Params::Logistic(p) => (Some(fold_logistic(p)), None, "lr"),
            Params::Forest(p) => (None, Some(flatten(p)), "rf"),
        };
        Model {
            params,
            thresholds,
            metadata,
            id: format!("{prefix}-{checksum:08x}"),
            checksum,
            bytes: Vec::new(),
            folded,
            forest,
        }
    }

    /// Reads and loads a model file.
    pub fn load_file(path: &Path) -> Result<Model, ModelError> {
        let len = std::fs::metadata(path)?.len();
        if len > MAX_FILE_BYTES as u64 {
            return Err(ModelError::Invalid(format!(
                "file is {len} bytes, over {MAX_FILE_BYTES}"
            )));
        }
        Model::load(&std::fs::read(path)?)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Short id: `lr-` or `rf-` and the file's checksum in hex.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file's CRC-32C.
    pub fn checksum(&self) -> u32 {
        self.checksum
    }

    /// Which algorithm.
    pub fn kind(&self) -> ModelKind {
        match self.params {
            Params::Logistic(_) => ModelKind::Logistic,
            Params::Forest(_) => ModelKind::Forest,
        }
    }

    /// The parameters, as in the file.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Fraud probability in [0, 1]. Allocates nothing.
    pub fn score(&self, features: &Features) -> f32 {
        if let Some((weights, bias)) = &self.folded {
            let z = weights
                .iter()
                .zip(features)
                .fold(*bias, |z, (w, x)| z + w * x);
            return sigmoid(z);
        }
        match &self.forest {
            Some(forest) => forest.score(features),
            None => 0.0,
        }
    }

    /// Decision for a score by the thresholds.
    pub fn decide(&self, score: f32) -> Decision {
        if score >= self.thresholds.decline {
            Decision::Decline
        } else if score >= self.thresholds.review {
            Decision::Review
        } else {
            Decision::Approve
        }
    }

    /// The thresholds.
    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// Worst-case cost: node visits (forest) or multiply-adds (logistic) per score.
    pub fn max_cost(&self) -> u64 {
        match &self.forest {
            Some(f) => f
                .block_steps
                .iter()
                .enumerate()
                .map(|(b, &steps)| {
                    let trees = (f.roots.len() - b * TREE_BLOCK).min(TREE_BLOCK);
                    u64::from(steps) * trees as u64
                })
                .sum(),
            None => FEATURE_COUNT as u64,
        }
    }

    /// Trees (0 for logistic).
    pub fn trees(&self) -> usize {
        self.forest.as_ref().map_or(0, |f| f.roots.len())
    }

    /// Deepest tree's depth in edges (0 for logistic).
    pub fn depth(&self) -> u32 {
        self.forest.as_ref().map_or(0, |f| f.max_depth)
    }

    /// Reason codes: the `top` features that pushed the score up most. Logistic: weight ×
    /// standardized value; forest: the change in node value along each tree's path,
    /// charged to the split feature, averaged over trees.
    pub fn contributions(&self, features: &Features, top: usize) -> Vec<(&'static str, f32)> {
        let mut by_feature = [0f32; FEATURE_COUNT];
        match &self.params {
            Params::Logistic(p) => {
                for i in 0..FEATURE_COUNT {
                    by_feature[i] = p.weights[i] * (features[i] - p.mean[i]) / p.std[i];
                }
            }
            Params::Forest(_) => {
                if let Some(f) = &self.forest {
                    f.attribute(features, &mut by_feature);
                }
            }
        }
        let mut ranked: Vec<(&'static str, f32)> =
            FEATURE_NAMES.iter().copied().zip(by_feature).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.truncate(top);
        ranked
    }

    /// Training summary.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn fold_logistic(p: &LogisticParams) -> ([f32; FEATURE_COUNT], f32) {
    let mut weights = [0f32; FEATURE_COUNT];
    let mut bias = p.bias;
    for (i, w) in weights.iter_mut().enumerate() {
        *w = p.weights[i] / p.std[i];
        bias -= *w * p.mean[i];
    }
    (weights, bias)
}

/// Leaves become self loops that keep any non-NaN value on the left, so a walk of a fixed
/// number of steps ends on the leaf whatever the tree's shape.
fn flatten(p: &ForestParams) -> FlatForest {
    let n = p.feature.len();
    let mut f = FlatForest {
        nodes: Vec::new(),
        feature: p.feature.clone(),
        threshold: p.threshold.clone(),
        left: p.left.clone(),
        right: p.right.clone(),
        value: p.value.clone(),
        roots: p.roots.clone(),
        block_steps: Vec::new(),
        max_depth: 0,
    };
    let mut depth = vec![0u32; n];
    for i in 0..n {
        if p.feature[i] == LEAF {
            f.feature[i] = 0;
            f.threshold[i] = f32::INFINITY;
            (f.left[i], f.right[i]) = (i as u32, i as u32);
        } else {
            // Validated: children after parents, so depth[i] is final here.
            for c in [p.left[i], p.right[i]] {
                depth[c as usize] = depth[c as usize].max(depth[i] + 1);
            }
        }
    }
    let tree_depth = |t: usize| {
        let start = p.roots[t] as usize;
        let end = p.roots.get(t + 1).map_or(n, |&r| r as usize);
        depth[start..end].iter().copied().max().unwrap_or(0)
    };
    for block in (0..p.roots.len()).collect::<Vec<_>>().chunks(TREE_BLOCK) {
        f.block_steps
            .push(block.iter().map(|&t| tree_depth(t)).max().unwrap_or(0));
    }
    f.max_depth = f.block_steps.iter().copied().max().unwrap_or(0);
    f.nodes = (0..n)
        .map(|i| Node {
            threshold: f.threshold[i],
            feature: u32::from(f.feature[i]),
            child: [f.left[i], f.right[i]],
        })
        .collect();
    f
}

impl FlatForest {
    fn score(&self, x: &Features) -> f32 {
        let mut sum = 0f32;
        for (b, &steps) in self.block_steps.iter().enumerate() {
            let roots = &self.roots[b * TREE_BLOCK..];
            let mut at = [0u32; TREE_BLOCK];
            let trees = roots.len().min(TREE_BLOCK);
            at[..trees].copy_from_slice(&roots[..trees]);
            // Unused lanes walk tree 0's root harmlessly and are not summed.
            for lane in at.iter_mut().skip(trees) {
                *lane = roots[0];
            }
            for _ in 0..steps {
                for at in at.iter_mut() {
                    let node = &self.nodes[*at as usize];
                    // Not `x > t`: NaN must go right, as `x <= t` sends it in `attribute`.
                    let left = x[node.feature as usize] <= node.threshold;
                    let right = !left;
                    *at = node.child[usize::from(right)];
                }
            }
            sum += at[..trees]
                .iter()
                .map(|&i| self.value[i as usize])
                .sum::<f32>();
        }
        sum / self.roots.len().max(1) as f32
    }

    fn attribute(&self, x: &Features, out: &mut [f32; FEATURE_COUNT]) {
        let trees = self.roots.len().max(1) as f32;
        for &root in &self.roots {
            let mut i = root as usize;
            // Bounded by the validated depth: leaves loop to themselves.
            for _ in 0..=self.max_depth {
                let next = if x[usize::from(self.feature[i])] <= self.threshold[i] {
                    self.left[i]
                } else {
                    self.right[i]
                } as usize;
                if next == i {
                    break;
                }
                out[usize::from(self.feature[i])] += (self.value[next] - self.value[i]) / trees;
                i = next;
            }
        }
    }
}

/// Checks magic, version, length and checksum; returns the body.
fn check_envelope(bytes: &[u8]) -> Result<&[u8], ModelError> {
    if bytes.len() < 4 || bytes[..4] != MAGIC {
        return Err(ModelError::Magic);
    }
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(ModelError::Truncated);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FORMAT_VERSION {
        return Err(ModelError::FormatVersion(version));
    }
    let body_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if bytes.len() != HEADER_BYTES + body_len.min(MAX_FILE_BYTES) + 4 {
        return Err(ModelError::Truncated);
    }
    let (signed, stored) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = crc32c(signed);
    if stored != computed {
        return Err(ModelError::Checksum { stored, computed });
    }
    Ok(&signed[HEADER_BYTES..])
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelError> {
        let end = self.at.checked_add(n).ok_or(ModelError::Truncated)?;
        let out = self.bytes.get(self.at..end).ok_or(ModelError::Truncated)?;
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ModelError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ModelError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ModelError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn f32(&mut self) -> Result<f32, ModelError> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn f32s(&mut self) -> Result<[f32; FEATURE_COUNT], ModelError> {
        let mut out = [0f32; FEATURE_COUNT];
        for v in &mut out {
            *v = finite(self.f32()?)?;
        }
        Ok(out)
    }
}

fn finite(v: f32) -> Result<f32, ModelError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ModelError::Invalid("a parameter is not finite".into()))
    }
}

fn read_preamble(r: &mut Reader<'_>) -> Result<(Thresholds, Metadata), ModelError> {
    let found = r.u32()?;
    let found_count = r.u16()?;
    if found != SCHEMA_VERSION || usize::from(found_count) != FEATURE_COUNT {
        return Err(ModelError::Schema { found, found_count });
    }
    for expected in FEATURE_NAMES {
        let len = r.u8()?;
        if r.take(usize::from(len))? != expected.as_bytes() {
            return Err(ModelError::Invalid(format!(
                "feature names differ from schema {SCHEMA_VERSION} at `{expected}`"
            )));
        }
    }
    let thresholds = Thresholds {
        review: finite(r.f32()?)?,
        decline: finite(r.f32()?)?,
    };
    let len = r.u32()? as usize;
    let metadata = serde_json::from_slice(r.take(len)?)
        .map_err(|e| ModelError::Invalid(format!("metadata: {e}")))?;
    Ok((thresholds, metadata))
}

fn read_logistic(r: &mut Reader<'_>) -> Result<LogisticParams, ModelError> {
    let bias = finite(r.f32()?)?;
    let (weights, mean, std) = (r.f32s()?, r.f32s()?, r.f32s()?);
    if std.iter().any(|&s| s <= 0.0) {
        return Err(ModelError::Invalid(
            "a standard deviation is not positive".into(),
        ));
    }
    Ok(LogisticParams {
        bias,
        weights,
        mean,
        std,
    })
}

fn read_forest(r: &mut Reader<'_>) -> Result<ForestParams, ModelError> {
    let trees = r.u32()? as usize;
    let nodes = r.u32()? as usize;
    // A node is 18 bytes: a count the remaining bytes cannot hold is refused before any
    // allocation sized by it.
    if trees == 0 || trees > MAX_TREES || nodes.saturating_mul(18) > r.bytes.len() - r.at {
        return Err(ModelError::Invalid(format!("{trees} trees, {nodes} nodes")));
    }
    let mut p = ForestParams {
        feature: Vec::with_capacity(nodes),
        threshold: Vec::with_capacity(nodes),
        left: Vec::with_capacity(nodes),
        right: Vec::with_capacity(nodes),
        value: Vec::with_capacity(nodes),
        roots: (0..trees).map(|_| r.u32()).collect::<Result<_, _>>()?,
    };
    for _ in 0..nodes {
        p.feature.push(r.u16()?);
        p.threshold.push(r.f32()?);
        p.left.push(r.u32()?);
        p.right.push(r.u32()?);
        p.value.push(r.f32()?);
    }
    validate_forest(&p)?;
    Ok(p)
}

/// Roots ascending and in range, tree `t` spans `roots[t]..roots[t+1]`, children inside
/// their tree and after their parent, features in range, values probabilities, depth bounded.
fn validate_forest(p: &ForestParams) -> Result<(), ModelError> {
    let n = p.feature.len();
    let bad = |what: String| Err(ModelError::Invalid(what));
    if p.roots.first() != Some(&0) || p.roots.windows(2).any(|w| w[0] >= w[1]) {
        return bad("tree roots are not ascending from 0".into());
    }
    let mut depth = vec![0usize; n];
    for (t, &root) in p.roots.iter().enumerate() {
        let end = p.roots.get(t + 1).map_or(n, |&r| r as usize);
        if root as usize >= n || end > n {
            return bad(format!("tree {t} is out of range"));
        }
        for i in root as usize..end {
            if !(0.0..=1.0).contains(&p.value[i]) {
                return bad(format!("node {i} value is not a probability"));
            }
            if p.feature[i] == LEAF {
                continue;
            }
            if usize::from(p.feature[i]) >= FEATURE_COUNT || p.threshold[i].is_nan() {
                return bad(format!("node {i} splits on a bad feature or threshold"));
            }
            for c in [p.left[i] as usize, p.right[i] as usize] {
                if c <= i || c >= end {
                    return bad(format!("node {i} has a child outside its tree"));
                }
                depth[c] = depth[c].max(depth[i] + 1);
                if depth[c] > MAX_DEPTH {
                    return bad(format!("tree {t} is deeper than {MAX_DEPTH}"));
                }
            }
        }
    }
    Ok(())
}

fn encode(params: &Params, thresholds: Thresholds, metadata: &Metadata) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    body.extend_from_slice(&(FEATURE_COUNT as u16).to_le_bytes());
    for name in FEATURE_NAMES {
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
    }
    body.extend_from_slice(&thresholds.review.to_le_bytes());
    body.extend_from_slice(&thresholds.decline.to_le_bytes());
    // Metadata is plain strings and numbers: serializing it cannot fail.
    let json = serde_json::to_vec(metadata).unwrap_or_default();
    body.extend_from_slice(&(json.len() as u32).to_le_bytes());
    body.extend_from_slice(&json);
    let kind = match params {
        Params::Logistic(p) => {
            encode_logistic(p, &mut body);
            ModelKind::Logistic
        }
        Params::Forest(p) => {
            encode_forest(p, &mut body);
            ModelKind::Forest
        }
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[kind.code(), 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn encode_logistic(p: &LogisticParams, body: &mut Vec<u8>) {
    body.extend_from_slice(&p.bias.to_le_bytes());
    for v in p.weights.iter().chain(&p.mean).chain(&p.std) {
        body.extend_from_slice(&v.to_le_bytes());
    }
}

fn encode_forest(p: &ForestParams, body: &mut Vec<u8>) {
    body.extend_from_slice(&(p.roots.len() as u32).to_le_bytes());
    body.extend_from_slice(&(p.feature.len() as u32).to_le_bytes());
    for r in &p.roots {
        body.extend_from_slice(&r.to_le_bytes());
    }
    for i in 0..p.feature.len() {
        body.extend_from_slice(&p.feature[i].to_le_bytes());
        body.extend_from_slice(&p.threshold[i].to_le_bytes());
        body.extend_from_slice(&p.left[i].to_le_bytes());
        body.extend_from_slice(&p.right[i].to_le_bytes());
        body.extend_from_slice(&p.value[i].to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stumps on feature 0: left (x <= 1) 0.1, right 0.9; second tree is a leaf 0.5.
    fn tiny_forest() -> Model {
        let params = Params::Forest(ForestParams {
            feature: vec![0, LEAF, LEAF, LEAF],
            threshold: vec![1.0, 0.0, 0.0, 0.0],
            left: vec![1, 0, 0, 0],
            right: vec![2, 0, 0, 0],
            value: vec![0.5, 0.1, 0.9, 0.5],
            roots: vec![0, 3],
        });
        let thresholds = Thresholds {
            review: 0.4,
            decline: 0.6,
        };
        Model::new(params, thresholds, Metadata::default()).unwrap()
    }

    fn logistic() -> Model {
        let mut weights = [0f32; FEATURE_COUNT];
        weights[0] = 2.0;
        let params = Params::Logistic(LogisticParams {
            bias: -1.0,
            weights,
            mean: [1.0; FEATURE_COUNT],
            std: [2.0; FEATURE_COUNT],
        });
        Model::new(
            params,
            Thresholds {
                review: 0.5,
                decline: 0.9,
            },
            Metadata::default(),
        )
        .unwrap()
    }

    #[test]
    fn forest_scores_and_decides() {
        let m = tiny_forest();
        let mut x = [0f32; FEATURE_COUNT];
        assert!((m.score(&x) - 0.3).abs() < 1e-6);
        assert_eq!(m.decide(m.score(&x)), Decision::Approve);
        x[0] = 1.5;
        assert!((m.score(&x) - 0.7).abs() < 1e-6);
        assert_eq!(m.decide(0.7), Decision::Decline);
        assert_eq!(m.decide(0.5), Decision::Review);
        assert_eq!(m.trees(), 2);
        assert_eq!(m.depth(), 1);
        let top = m.contributions(&x, 1);
        assert_eq!(top[0].0, "amount_log");
        assert!((top[0].1 - 0.2).abs() < 1e-6);
        assert!(m.id().starts_with("rf-"));
    }

    #[test]
    fn logistic_scores_standardized() {
        let m = logistic();
        let mut x = [1f32; FEATURE_COUNT];
        x[0] = 2.0; // z = -1 + 2·(2−1)/2 = 0
        assert!((m.score(&x) - 0.5).abs() < 1e-6);
        assert_eq!(m.contributions(&x, 1)[0].0, "amount_log");
    }

    #[test]
    fn round_trip() {
        for m in [tiny_forest(), logistic()] {
            let bytes = m.to_bytes();
            let back = Model::load(&bytes).unwrap();
            assert_eq!(back.params(), m.params());
            assert_eq!(back.to_bytes(), bytes);
            assert_eq!(back.id(), m.id());
        }
    }

    #[test]
    fn corrupted_checksum_is_refused() {
        let mut bytes = tiny_forest().to_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        assert!(matches!(
            Model::load(&bytes),
            Err(ModelError::Checksum { .. })
        ));
    }

    #[test]
    fn wrong_schema_is_refused() {
        let mut bytes = tiny_forest().to_bytes();
        bytes[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(SCHEMA_VERSION + 1).to_le_bytes());
        let n = bytes.len();
        let crc = crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = Model::load(&bytes).unwrap_err();
        assert!(matches!(err, ModelError::Schema { .. }), "{err}");
    }

    #[test]
    fn truncated_file_is_refused() {
        let bytes = logistic().to_bytes();
        for cut in [0, 3, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(Model::load(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_cycle_is_refused_even_with_a_good_checksum() {
        let params = Params::Forest(ForestParams {
            feature: vec![0, 0],
            threshold: vec![1.0, 1.0],
            left: vec![1, 0],
            right: vec![1, 0],
            value: vec![0.5, 0.5],
            roots: vec![0],
        });
        let bytes = encode(
            &params,
            Thresholds {
                review: 0.5,
                decline: 0.9,
            },
            &Metadata::default(),
        );
        assert!(matches!(Model::load(&bytes), Err(ModelError::Invalid(_))));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Model::load(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_header_never_panic(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            // Forge a checksum so the parser behind it is exercised, not only the CRC.
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&[2, 0]);
            bytes.extend_from_slice(&(tail.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&tail);
            let crc = crc32c(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            let _ = Model::load(&bytes);
        }
    }
}
