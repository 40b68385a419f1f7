//! leash: align language models to human preferences (SFT, DPO, IPO, KTO, ORPO, LoRA, GRPO)
//! on candle, reproducing Hugging Face TRL's numbers.

pub mod bench;
pub mod data;
pub mod demo;
pub mod device;
pub mod error;
pub mod eval;
pub mod files;
pub mod kernels;
pub mod lab;
pub mod loss;
pub mod merge;
pub mod model;
pub mod model_io;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod scoring;
pub mod train;

pub use error::{LeashError, Result};
