//! A LoRA policy for gradient tests: rank 4, α 8 on every linear layer (PEFT's `all-linear`),
//! adapters seeded 7, and B drawn non-zero (PEFT starts it at 0, which would give A no
//! gradient).

use candle_core::{Device, Tensor, Var};
use leash::model::lora::{init_adapters, select_targets, TargetModules};
use leash::model::Decoder;

/// `base` with such adapters at LoRA dropout `dropout`, and the adapters' variables.
pub fn all_linear_lora(base: &Decoder, dropout: f64) -> (Decoder, Vec<(String, Var)>) {
    let modules = base.linear_modules().to_vec();
    let targets = select_targets(&modules, &TargetModules::from_cli("all-linear")).unwrap();
    let (vars, adapters) = init_adapters(&targets, 4, 8.0, dropout, 7, &Device::Cpu).unwrap();
    for (name, v) in &vars {
        if name.contains("lora_B") {
            v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    (base.with_adapters(&adapters).unwrap(), vars)
}
