//! Reports: plots drawn beside the numbers, TensorBoard event files, a run's report.md.

pub mod plot;
pub mod run_report;
pub mod tensorboard;
