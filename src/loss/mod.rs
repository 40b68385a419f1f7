//! Losses: sequence log-probs and each preference objective as a pure function.

pub mod logps;
pub mod token_logprob;
