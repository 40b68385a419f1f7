//! Losses: sequence log-probs and each preference objective as a pure function.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod lm_head_logprob;
pub mod log_sigmoid;
pub mod logps;
pub mod orpo;
pub mod token_logprob;
