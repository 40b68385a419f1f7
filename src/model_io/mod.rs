//! Model and adapter input/output, below the commands that use it (train, eval, merge,
//! logps): load a Hugging Face model folder with its tokenizer, load and save PEFT adapters,
//! save a trained model in Hugging Face layout. Training checkpoints (optimizer moments,
//! trainer state) build on this in src/train/checkpoint.rs.

mod load;
mod save;

pub use crate::model::lora::{load_adapter, save_adapter, AdapterConfig};
pub use load::{load_model, load_model_as};
pub use save::{save_model, save_weights};
