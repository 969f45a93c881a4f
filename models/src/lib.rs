//! Fraud scoring for payswitch: features, velocity state, model files, training,
//! evaluation and rules. Sans-IO.
//!
//! Empty until the fraud-scoring work lands (issue 3); until then the switch decides
//! `approve` for every well-formed authorization and says `model=none` in field 48.
pub mod data;
