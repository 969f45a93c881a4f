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
//! steps, so the walk has no data-dependent branch and the trees' loads overlap. At load
//! time each tree up to [`MAX_PERFECT_DEPTH`] deep is padded to a perfect tree laid out
//! breadth first, so a step computes its child instead of loading it, and thresholds become
//! integers ([`order_key`]) compared against the row's keys; deeper trees are walked node by
//! node, leaves looping to themselves.

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
/// Deepest tree laid out as a perfect tree: a block of 8 perfect trees of depth 9 takes
/// 72 KiB, so even [`MAX_TREES`] of them stay under 40 MiB. Deeper trees are sparse and keep
/// the node walk, which stores only the file's nodes.
pub const MAX_PERFECT_DEPTH: u32 = 9;
/// A row's keys padded to every value of a byte, so a perfect tree's split feature (a `u8`)
/// indexes them without a bounds check; 1 KiB zeroed per score.
const ROW_KEYS: usize = 1 << u8::BITS;
// Perfect blocks store a split's feature in a byte.
const _: () = assert!(FEATURE_COUNT <= ROW_KEYS);

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

/// The evaluator's forest: blocks of [`TREE_BLOCK`] consecutive trees, each block's leaf
/// values summed in tree order and the block sums added in block order (the sum is the same
/// to the bit whichever way a block is walked).
#[derive(Clone, Debug)]
struct FlatForest {
    blocks: Vec<Block>,
    /// The node walk's records, for blocks deeper than [`MAX_PERFECT_DEPTH`] (else empty).
    nodes: Vec<Node>,
    /// The file's arrays, walked node by node for reason codes.
    feature: Vec<u16>,
    threshold: Vec<f32>,
    left: Vec<u32>,
    right: Vec<u32>,
    value: Vec<f32>,
    roots: Vec<u32>,
    /// Deepest tree's depth in edges.
    max_depth: u32,
}

/// Up to [`TREE_BLOCK`] consecutive trees walked in lock step.
#[derive(Clone, Debug)]
struct Block {
    /// Trees in the block: [`TREE_BLOCK`] but in the last block.
    trees: usize,
    /// Steps each tree is walked: enough to reach every leaf of the block.
    steps: u32,
    layout: BlockLayout,
}

#[derive(Clone, Debug)]
enum BlockLayout {
    /// Trees of depth up to 7 (`--depth 8`, the default), padded to depth 7.
    Perfect7(PerfectBlock<7, 256>),
    /// Trees of depth 8 to [`MAX_PERFECT_DEPTH`], padded to depth 9.
    Perfect9(PerfectBlock<9, 1024>),
    /// Deeper trees: walk the file's nodes from these roots. Lanes past the block's trees
    /// walk its first tree again and are not summed.
    Nodes([u32; TREE_BLOCK]),
}

/// A block's trees padded to perfect trees of depth `DEPTH`, a leaf above the bottom
/// repeated over its whole subtree. A step computes the child (`2j + 1` or `2j + 2`) instead
/// of loading it, so it is two independent loads and an integer compare; with `DEPTH` a
/// constant the walk unrolls and the compiler proves every index below `SPLITS`
/// (`2^(DEPTH + 1)`): no bounds checks. Lanes past the block's trees are all-zero trees,
/// summed as `+0.0`, which changes no sum of probabilities.
#[derive(Clone, Debug)]
struct PerfectBlock<const DEPTH: u32, const SPLITS: usize> {
    lanes: Box<[PerfectTree<SPLITS>; TREE_BLOCK]>,
}

/// One perfect tree, positions breadth first (position `j` has children `2j + 1` and
/// `2j + 2`). One record per tree puts all of a block's arrays at fixed offsets from one
/// base address, which leaves the walk a register per lane.
#[derive(Clone, Copy, Debug)]
struct PerfectTree<const SPLITS: usize> {
    /// Split feature at positions `0..2^DEPTH - 1`.
    feature: [u8; SPLITS],
    /// Split threshold's [`order_key`] at the same positions.
    threshold: [u32; SPLITS],
    /// Leaf value at the bottom row's positions, `2^DEPTH - 1..2^(DEPTH + 1) - 1`.
    leaf: [f32; SPLITS],
}

/// One node as the node walk reads it: split feature and threshold, children `[left, right]`.
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

    /// Worst-case cost: node visits (forest: steps walked × trees, a tree padded to a
    /// perfect tree counting its padded depth) or multiply-adds (logistic) per score.
    pub fn max_cost(&self) -> u64 {
        match &self.forest {
            Some(f) => f
                .blocks
                .iter()
                .map(|b| u64::from(b.steps) * b.trees as u64)
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

/// Builds the evaluator's layout from validated parameters.
fn flatten(p: &ForestParams) -> FlatForest {
    let n = p.feature.len();
    let mut depth = vec![0u32; n];
    for i in 0..n {
        if p.feature[i] != LEAF {
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
    let mut blocks = Vec::new();
    for (b, roots) in p.roots.chunks(TREE_BLOCK).enumerate() {
        let first = b * TREE_BLOCK;
        let block_depth = (first..first + roots.len())
            .map(tree_depth)
            .max()
            .unwrap_or(0);
        let (steps, layout) = if block_depth <= 7 {
            (7, BlockLayout::Perfect7(PerfectBlock::new(p, roots)))
        } else if block_depth <= MAX_PERFECT_DEPTH {
            (9, BlockLayout::Perfect9(PerfectBlock::new(p, roots)))
        } else {
            let mut lanes = [roots[0]; TREE_BLOCK];
            lanes[..roots.len()].copy_from_slice(roots);
            (block_depth, BlockLayout::Nodes(lanes))
        };
        blocks.push(Block {
            trees: roots.len(),
            steps,
            layout,
        });
    }
    let mut f = self_looped(p);
    if blocks
        .iter()
        .any(|b| matches!(b.layout, BlockLayout::Nodes(_)))
    {
        f.nodes = node_records(&f);
    }
    f.blocks = blocks;
    f.max_depth = (0..p.roots.len()).map(tree_depth).max().unwrap_or(0);
    f
}

/// The file's arrays with leaves turned into self loops that keep any non-NaN value on the
/// left, so a walk ends on the leaf whatever the tree's shape.
fn self_looped(p: &ForestParams) -> FlatForest {
    let mut f = FlatForest {
        blocks: Vec::new(),
        nodes: Vec::new(),
        feature: p.feature.clone(),
        threshold: p.threshold.clone(),
        left: p.left.clone(),
        right: p.right.clone(),
        value: p.value.clone(),
        roots: p.roots.clone(),
        max_depth: 0,
    };
    for i in 0..p.feature.len() {
        if p.feature[i] == LEAF {
            f.feature[i] = 0;
            f.threshold[i] = f32::INFINITY;
            (f.left[i], f.right[i]) = (i as u32, i as u32);
        }
    }
    f
}

/// The node walk's records, from the self-looped arrays.
fn node_records(f: &FlatForest) -> Vec<Node> {
    (0..f.feature.len())
        .map(|i| Node {
            threshold: f.threshold[i],
            feature: u32::from(f.feature[i]),
            child: [f.left[i], f.right[i]],
        })
        .collect()
}

/// Maps floats to integers in the same order: `key(a) <= key(b)` exactly when `a <= b` for
/// non-NaN values (the two zeros are one key), and NaN above every number, so it goes right
/// as `x <= t` sends it. A walk step then compares integers, which is a shorter dependency
/// chain than a float compare.
fn order_key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    // `-0.0 + 0.0` is `+0.0`: the zeros compare equal as floats.
    let bits = (v + 0.0).to_bits();
    if bits >> 31 == 1 {
        // Negative: the magnitude bits grow as the value falls, so flip them all.
        !bits
    } else {
        bits | (1 << 31)
    }
}

impl<const DEPTH: u32, const SPLITS: usize> PerfectBlock<DEPTH, SPLITS> {
    /// Lays out the trees at `roots`, none deeper than `DEPTH`.
    fn new(p: &ForestParams, roots: &[u32]) -> Self {
        const { assert!(SPLITS == 2 << DEPTH) };
        let empty = PerfectTree {
            feature: [0; SPLITS],
            threshold: [0; SPLITS],
            leaf: [0.0; SPLITS],
        };
        // Built on the heap: a block of depth 9 is 72 KiB.
        let mut lanes: Box<[PerfectTree<SPLITS>; TREE_BLOCK]> = vec![empty; TREE_BLOCK]
            .into_boxed_slice()
            .try_into()
            .expect("the vector has TREE_BLOCK elements");
        let splits = (1usize << DEPTH) - 1;
        // The file's node at each position of the perfect tree.
        let mut origin = vec![0u32; 2 * splits + 1];
        for (tree, &root) in lanes.iter_mut().zip(roots) {
            origin[0] = root;
            for j in 0..splits {
                let i = origin[j] as usize;
                if p.feature[i] == LEAF {
                    // Both sides reach the same leaf: the split's outcome does not matter.
                    origin[2 * j + 1] = i as u32;
                    origin[2 * j + 2] = i as u32;
                } else {
                    // Validated below FEATURE_COUNT, which fits a byte (asserted at compile time).
                    tree.feature[j] = p.feature[i] as u8;
                    tree.threshold[j] = order_key(p.threshold[i]);
                    origin[2 * j + 1] = p.left[i];
                    origin[2 * j + 2] = p.right[i];
                }
            }
            // No tree is deeper than DEPTH: the bottom row holds only leaves.
            for (leaf, &i) in tree.leaf[splits..].iter_mut().zip(&origin[splits..]) {
                debug_assert_eq!(p.feature[i as usize], LEAF);
                *leaf = p.value[i as usize];
            }
        }
        PerfectBlock { lanes }
    }

    /// Sum of the lanes' leaf values, in lane order. `x` holds the features' [`order_key`]s.
    fn walk(&self, x: &[u32; ROW_KEYS]) -> f32 {
        let mut at = [0usize; TREE_BLOCK];
        for _ in 0..DEPTH {
            for (tree, j) in self.lanes.iter().zip(&mut at) {
                // `x > t` as keys, which is `!(x <= t)` as floats: NaN goes right.
                let right = tree.threshold[*j] < x[usize::from(tree.feature[*j])];
                *j = 2 * *j + 1 + usize::from(right);
            }
        }
        self.lanes
            .iter()
            .zip(at)
            .map(|(tree, j)| tree.leaf[j])
            .sum::<f32>()
    }
}

impl FlatForest {
    fn score(&self, x: &Features) -> f32 {
        let mut keys = [0u32; ROW_KEYS];
        for (key, &v) in keys.iter_mut().zip(x) {
            *key = order_key(v);
        }
        let mut sum = 0f32;
        for block in &self.blocks {
            sum += match &block.layout {
                BlockLayout::Perfect7(b) => b.walk(&keys),
                BlockLayout::Perfect9(b) => b.walk(&keys),
                BlockLayout::Nodes(roots) => self.walk_nodes(block, *roots, x),
            };
        }
        sum / self.roots.len().max(1) as f32
    }

    /// Sum of the block's leaf values, in tree order, walking the file's nodes.
    fn walk_nodes(&self, block: &Block, roots: [u32; TREE_BLOCK], x: &Features) -> f32 {
        let mut at = roots;
        for _ in 0..block.steps {
            for at in at.iter_mut() {
                let node = &self.nodes[*at as usize];
                // Not `x > t`: NaN must go right, as `x <= t` sends it in `attribute`.
                let left = x[node.feature as usize] <= node.threshold;
                *at = node.child[usize::from(!left)];
            }
        }
        at[..block.trees]
            .iter()
            .map(|&i| self.value[i as usize])
            .sum::<f32>()
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

    /// splitmix64: seeded, so a failing case replays exactly.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }

        /// Mostly values that thresholds also take, so rows land on thresholds exactly.
        fn number(&mut self) -> f32 {
            const SHARED: [f32; 9] = [
                f32::NEG_INFINITY,
                -1.5,
                -0.0,
                0.0,
                1e-40,
                0.25,
                1.0,
                3.0,
                f32::INFINITY,
            ];
            match self.below(3) {
                0 => self.unit() * 8.0 - 4.0,
                _ => SHARED[self.below(SHARED.len())],
            }
        }
    }

    /// Appends a random tree (children after parents) and returns its root. The leftmost
    /// path reaches `depth` when `full`, so a forest's depth is known.
    fn random_tree(rng: &mut SplitMix, p: &mut ForestParams, depth: u32, full: bool) -> u32 {
        let i = p.feature.len();
        p.feature.push(LEAF);
        p.threshold.push(0.0);
        p.left.push(0);
        p.right.push(0);
        p.value.push(rng.unit());
        if depth > 0 && (full || rng.below(4) != 0) {
            p.feature[i] = rng.below(FEATURE_COUNT) as u16;
            p.threshold[i] = rng.number();
            p.left[i] = random_tree(rng, p, depth - 1, full);
            p.right[i] = random_tree(rng, p, depth - 1, false);
        }
        i as u32
    }

    /// The forest's definition walked as plainly as possible: each tree from its root,
    /// left when `x <= threshold`, leaf values summed per block of `TREE_BLOCK` trees.
    fn reference_score(p: &ForestParams, x: &Features) -> f32 {
        let leaf_value = |root: u32| {
            let mut i = root as usize;
            while p.feature[i] != LEAF {
                let left = x[usize::from(p.feature[i])] <= p.threshold[i];
                i = if left { p.left[i] } else { p.right[i] } as usize;
            }
            p.value[i]
        };
        let sum = p
            .roots
            .chunks(TREE_BLOCK)
            .map(|block| block.iter().map(|&root| leaf_value(root)).sum::<f32>())
            .fold(0f32, |sum, block| sum + block);
        sum / p.roots.len() as f32
    }

    #[test]
    fn forest_scores_match_a_plain_walk_bit_for_bit() {
        let mut rng = SplitMix(3);
        // Depths on both sides of each layout's limit: perfect 7, perfect 9, node walk.
        for depth in [0, 1, 3, 6, 7, 8, 9, 10, 12] {
            for _ in 0..4 {
                let mut p = ForestParams {
                    feature: Vec::new(),
                    threshold: Vec::new(),
                    left: Vec::new(),
                    right: Vec::new(),
                    value: Vec::new(),
                    roots: Vec::new(),
                };
                // 1 to 20 trees: partial last blocks, blocks of mixed depths.
                for t in 0..1 + rng.below(20) {
                    let tree_depth = if t == 0 {
                        depth
                    } else {
                        rng.below(depth as usize + 1) as u32
                    };
                    let root = random_tree(&mut rng, &mut p, tree_depth, t == 0);
                    p.roots.push(root);
                }
                let thresholds = Thresholds {
                    review: 0.5,
                    decline: 0.9,
                };
                let m =
                    Model::new(Params::Forest(p.clone()), thresholds, Metadata::default()).unwrap();
                assert_eq!(m.depth(), depth);
                for _ in 0..200 {
                    let mut x = [0f32; FEATURE_COUNT];
                    for v in &mut x {
                        *v = if rng.below(20) == 0 {
                            f32::NAN
                        } else {
                            rng.number()
                        };
                    }
                    let (got, want) = (m.score(&x), reference_score(&p, &x));
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "depth {depth}, {x:?}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn order_key_orders_like_float_comparison() {
        let values = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1.0,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for a in values {
            for b in values {
                assert_eq!(order_key(a) <= order_key(b), a <= b, "{a} <= {b}");
            }
            // NaN goes right of every threshold, as `!(NaN <= t)`.
            assert!(order_key(f32::NAN) > order_key(a));
            assert!(order_key(-f32::NAN) > order_key(a));
        }
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
