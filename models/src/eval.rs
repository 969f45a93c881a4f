//! Evaluation metrics over scores and labels: AUC-ROC, average precision (AUC-PR), recall
//! at fixed false-positive rates, fraud amount caught. Ties in score are one threshold: a
//! group of equal scores is counted together, never split by input order.

use serde::{Deserialize, Serialize};

/// False-positive rates at which recall is reported.
pub const REPORTED_FPRS: [f64; 3] = [0.001, 0.005, 0.01];

/// One scored, labeled transaction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Model score.
    pub score: f32,
    /// True when fraud.
    pub is_fraud: bool,
    /// Amount in minor units.
    pub amount_minor: u64,
}

/// The metrics of one evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Transactions.
    pub n: u64,
    /// Fraudulent transactions.
    pub n_fraud: u64,
    /// Area under the ROC curve.
    pub auc_roc: f64,
    /// Average precision (area under the precision-recall curve, step-wise).
    pub auc_pr: f64,
    /// Recall at FPR 0.001, 0.005, 0.01, keyed by the rate as written.
    pub recall_at_fpr: std::collections::BTreeMap<String, f64>,
    /// Fraud amount with score at or above the decline threshold, minor units.
    pub fraud_amount_caught_minor: u64,
    /// Fraud amount in all, minor units.
    pub fraud_amount_minor: u64,
    /// Legitimate transactions at or above the decline threshold.
    pub legit_declined: u64,
    /// Fraud transactions at or above the decline threshold.
    pub fraud_declined: u64,
}

/// One point per distinct score, from the highest: cumulative (true, false) positives.
fn roc_steps(rows: &mut [Scored]) -> Vec<(u64, u64)> {
    rows.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut steps = Vec::new();
    let (mut tp, mut fp) = (0u64, 0u64);
    for (i, r) in rows.iter().enumerate() {
        if r.is_fraud {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_group = rows.get(i + 1).is_none_or(|next| next.score != r.score);
        if last_of_group {
            steps.push((tp, fp));
        }
    }
    steps
}

/// Computes the metrics; `decline` is the threshold for the amount caught.
pub fn evaluate(rows: &[Scored], decline: f32) -> Metrics {
    let mut sorted = rows.to_vec();
    let steps = roc_steps(&mut sorted);
    let pos = rows.iter().filter(|r| r.is_fraud).count() as u64;
    let neg = rows.len() as u64 - pos;
    let mut metrics = Metrics {
        n: rows.len() as u64,
        n_fraud: pos,
        auc_roc: auc_roc(&steps, pos, neg),
        auc_pr: average_precision(&steps, pos),
        ..Metrics::default()
    };
    for fpr in REPORTED_FPRS {
        metrics
            .recall_at_fpr
            .insert(fpr.to_string(), recall_at_fpr(&steps, pos, neg, fpr));
    }
    for r in rows {
        let declined = r.score >= decline;
        if r.is_fraud {
            metrics.fraud_amount_minor += r.amount_minor;
            if declined {
                metrics.fraud_amount_caught_minor += r.amount_minor;
                metrics.fraud_declined += 1;
            }
        } else if declined {
            metrics.legit_declined += 1;
        }
    }
    metrics
}

/// Trapezoids between the ROC points (ties give a diagonal, i.e. count half).
fn auc_roc(steps: &[(u64, u64)], pos: u64, neg: u64) -> f64 {
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    let mut area = 0.0;
    let (mut tp0, mut fp0) = (0u64, 0u64);
    for &(tp, fp) in steps {
        area += (fp - fp0) as f64 * (tp + tp0) as f64 / 2.0;
        (tp0, fp0) = (tp, fp);
    }
    area / (pos as f64 * neg as f64)
}

/// Σ (recall_k − recall_{k−1}) · precision_k over thresholds, as scikit-learn defines it.
fn average_precision(steps: &[(u64, u64)], pos: u64) -> f64 {
    if pos == 0 {
        return 0.0;
    }
    let mut ap = 0.0;
    let mut tp0 = 0u64;
    for &(tp, fp) in steps {
        ap += (tp - tp0) as f64 / pos as f64 * tp as f64 / (tp + fp) as f64;
        tp0 = tp;
    }
    ap
}

/// Best recall at a threshold whose false-positive rate is at most `fpr`.
fn recall_at_fpr(steps: &[(u64, u64)], pos: u64, neg: u64, fpr: f64) -> f64 {
    if pos == 0 {
        return 0.0;
    }
    let allowed = (fpr * neg as f64).floor() as u64;
    steps
        .iter()
        .take_while(|&&(_, fp)| fp <= allowed)
        .last()
        .map_or(0.0, |&(tp, _)| tp as f64 / pos as f64)
}

/// The lowest score threshold at which at most `fpr` of `legit_scores` score at or above it.
pub fn threshold_for_fpr(legit_scores: &[f32], fpr: f64) -> f32 {
    let mut desc = legit_scores.to_vec();
    desc.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * desc.len() as f64).floor() as usize;
    match desc.get(allowed) {
        // Just above the first legitimate score that must not be caught, so ties with it
        // are not caught either.
        Some(&s) => next_up(s),
        None => 0.0,
    }
}

/// The next representable f32 above `x` (finite `x`).
pub fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(pairs: &[(f32, bool)]) -> Vec<Scored> {
        pairs
            .iter()
            .map(|&(score, is_fraud)| Scored {
                score,
                is_fraud,
                amount_minor: 100,
            })
            .collect()
    }

    #[test]
    fn perfect_ranking_has_auc_one() {
        let m = evaluate(
            &rows(&[(0.9, true), (0.8, true), (0.2, false), (0.1, false)]),
            0.5,
        );
        assert_eq!(m.auc_roc, 1.0);
        assert_eq!(m.auc_pr, 1.0);
        assert_eq!(m.fraud_amount_caught_minor, 200);
        assert_eq!(m.recall_at_fpr["0.001"], 1.0);
    }

    #[test]
    fn known_auc_of_a_mixed_ranking() {
        // Pairs (fraud, legit) ranked right: (0.9,0.7),(0.9,0.3),(0.5,0.3) = 3 of 4.
        let m = evaluate(
            &rows(&[(0.9, true), (0.7, false), (0.5, true), (0.3, false)]),
            0.6,
        );
        assert!((m.auc_roc - 0.75).abs() < 1e-12, "{}", m.auc_roc);
        // AP = 1/2·1 + 1/2·2/3.
        assert!((m.auc_pr - (0.5 + 1.0 / 3.0)).abs() < 1e-12, "{}", m.auc_pr);
        assert_eq!(m.fraud_amount_caught_minor, 100);
        assert_eq!(m.legit_declined, 1);
    }

    #[test]
    fn ties_count_half_and_constant_scores_give_half() {
        let m = evaluate(&rows(&[(0.5, true), (0.5, false)]), 0.9);
        assert_eq!(m.auc_roc, 0.5);
        assert_eq!(
            m.recall_at_fpr["0.01"], 0.0,
            "the tie costs a false positive"
        );
    }

    #[test]
    fn recall_at_fpr_uses_the_allowed_false_positives() {
        // 1000 legit at 0..1, one legit at 0.95, fraud at 0.99 and 0.9.
        let mut pairs: Vec<(f32, bool)> = (0..1000).map(|i| (i as f32 / 2000.0, false)).collect();
        pairs.extend([(0.99, true), (0.95, false), (0.9, true)]);
        let m = evaluate(&rows(&pairs), 0.5);
        assert_eq!(m.recall_at_fpr["0.001"], 1.0, "one false positive allowed");
        let legit: Vec<f32> = pairs.iter().filter(|p| !p.1).map(|p| p.0).collect();
        let t = threshold_for_fpr(&legit, 0.001);
        assert!(t > 0.4995 && t <= 0.5, "{t}");
    }
}
