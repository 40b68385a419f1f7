//! Training: options, examples, the loop, optimizer, schedule, checkpoints, metrics.

pub mod args;
pub mod checkpoint;
pub mod config;
pub mod divergence;
pub mod engine;
pub mod examples;
pub mod grads;
pub mod grpo;
pub mod method_options;
pub mod metrics;
pub mod optimizer;
pub mod policy;
pub mod reference;
pub mod resume_check;
pub mod rewards;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod trainer;
pub mod update;
mod validate;

use crate::error::Result;
use config::{Method, TrainConfig};
use engine::TrainSummary;

/// Trains as `cfg` says: GRPO's online loop (sampling, rewards, learning) or the offline loop
/// every other method shares (SFT, DPO and its loss types, KTO, ORPO).
pub fn run(cfg: &TrainConfig) -> Result<TrainSummary> {
    if cfg.method == Method::Grpo {
        grpo::train(cfg)
    } else {
        trainer::train(cfg)
    }
}
