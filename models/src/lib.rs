//! Fraud scoring for payswitch: features, velocity state, model files, training,
//! evaluation and rules. Sans-IO.
//!
//! Module map: [`data`] reads and writes the labeled transaction CSV; [`features`] turns a
//! transaction plus the card's, merchant's and terminal's history ([`velocity`]: bounded,
//! exact-window state) into a fixed feature vector, the same code for training and serving;
//! [`model`] is payswitch's model file (magic `PSWM`, versioned, checksummed) and its
//! allocation-free evaluator; [`train`] replays a labeled file through the extractor and
//! trains with smartcore, then exports the parameters into a [`model::Model`]; [`eval`]
//! computes AUC-ROC, average precision and recall at fixed false-positive rates.
pub mod data;
pub mod eval;
pub mod features;
pub mod model;
#[cfg(feature = "train")]
pub mod train;
pub mod velocity;
