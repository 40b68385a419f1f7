//! Generation and evaluation: sampling, KL(π‖π_ref) on samples, judges, win rates.

pub mod evaluate;
pub mod generate;
pub mod judge;
