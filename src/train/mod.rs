//! Training: options, examples, the loop, optimizer, schedule, checkpoints, metrics.

pub mod checkpoint;
pub mod config;
pub mod divergence;
pub mod examples;
pub mod grads;
pub mod grpo;
pub mod method_options;
pub mod metrics;
pub mod optimizer;
pub mod policy;
pub mod reference;
pub mod resume_check;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod trainer;
pub mod update;
