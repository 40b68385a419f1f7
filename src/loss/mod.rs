//! Losses: sequence log-probs and each preference objective as a pure function.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod logps;
pub mod orpo;

/// Per-token statistics under their former path; the lm_head, log-softmax + gather and
/// log-sigmoid ops live in [`crate::kernels`].
pub mod token_logprob {
    pub use crate::kernels::row_stats::{row_stats, stats_of_row, RowStats};
}
