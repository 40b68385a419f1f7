//! Causal language models: config, weights, the decoder families, and a loaded checkpoint.

pub mod cache;
pub mod checkpoint;
pub mod config;
pub mod config_keys;
pub mod frozen_dtype;
pub mod gemma3;
pub mod gemma3_config;
pub mod gpt2;
pub mod linear;
pub mod llama;
pub mod lora;
/// The fused LoRA op under its former path; it lives in [`crate::kernels::cpu::lora_linear`].
pub mod lora_fused {
    pub use crate::kernels::cpu::lora_linear::{lora_linear, lora_linear_dropout};
}
pub mod lora_targets;
pub mod ops;
pub mod params;
pub mod phi3;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

pub use config::{Family, ModelConfig};
use params::ParamLoader;
pub use weights::Weights;

use crate::error::Result;

/// One batch of token rows ready for the decoder.
pub struct ForwardInput {
    /// (b, t) u32 token ids.
    pub ids: Tensor,
    /// b·t position ids, row-major (rotary or learned positions).
    pub positions: Vec<u32>,
    /// (b, 1, t, t) additive attention mask.
    pub mask: Tensor,
}

enum Arch {
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
    Gemma3(gemma3::Gemma3),
    Phi3(phi3::Phi3),
}

/// A causal LM producing final hidden states, plus its lm_head and parameter list.
pub struct Decoder {
    pub config: ModelConfig,
    arch: Arch,
    /// Parameters in checkpoint order under their Hugging Face names (tied lm_head excluded).
    params: Vec<(String, Tensor)>,
    /// Every linear module (path, sizes): what LoRA can target.
    modules: Vec<lora::LinearModule>,
    /// Keep only each layer's input for backward and rerun the layer there.
    gradient_checkpointing: bool,
}

impl Decoder {
    /// Loads config.json and the safetensors weights in `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, frozen_dtype::FrozenDtype::F32)
    }

    /// As [`Decoder::load`], holding the matrices as `frozen` says (for a model that is only
    /// ever frozen or copied into trainable f32 variables by [`Decoder::to_trainable`]).
    pub fn load_as(dir: &Path, device: &Device, frozen: frozen_dtype::FrozenDtype) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::from_dir_as(dir, device, frozen)?;
        Self::from_weights(config, &weights)
    }

    pub fn from_weights(config: ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, ParamLoader::new(weights))
    }

    fn build(config: ModelConfig, loader: ParamLoader) -> Result<Self> {
        let (arch, embedding) = match config.family {
            Family::Llama => (
                Arch::Llama(llama::Llama::load(&config, &loader)?),
                "model.embed_tokens.weight",
            ),
            Family::Gpt2 => (
                Arch::Gpt2(gpt2::Gpt2::load(&config, &loader)?),
                gpt2::embedding_name(&loader),
            ),
            Family::Gemma3 => (
                Arch::Gemma3(gemma3::Gemma3::load(&config, &loader)?),
                "model.embed_tokens.weight",
            ),
            Family::Phi3 => (
                Arch::Phi3(phi3::Phi3::load(&config, &loader)?),
                "model.embed_tokens.weight",
            ),
        };
        loader.check_all_used(config.tie_word_embeddings.then_some(embedding))?;
        let (params, modules) = loader.into_parts();
        Ok(Decoder {
            config,
            arch,
            params,
            modules,
            gradient_checkpointing: false,
        })
    }

    /// This model's weights (shared, not copied) with LoRA adapters attached.
    pub fn with_adapters(&self, adapters: &lora::Adapters) -> Result<Decoder> {
        let map = self.params.iter().cloned().collect();
        let weights = Weights::new(map, Path::new("<base + adapters>").to_path_buf());
        Self::build(
            self.config.clone(),
            ParamLoader::with_adapters(&weights, adapters),
        )
    }

    /// Turns gradient checkpointing on or off for this model's forward passes
    /// ([`checkpoint`]); training must then take gradients with [`checkpoint::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    pub fn linear_modules(&self) -> &[lora::LinearModule] {
        &self.modules
    }

    /// Final-normed hidden states (b, t, c).
    pub fn forward_hidden(&self, input: &ForwardInput) -> Result<Tensor> {
        self.forward_cached(input, None)
    }

    /// As [`Decoder::forward_hidden`], appending this step's keys/values to `cache`.
    pub fn forward_cached(
        &self,
        input: &ForwardInput,
        cache: Option<&mut cache::KvCache>,
    ) -> Result<Tensor> {
        match &self.arch {
            Arch::Llama(m) => m.forward_hidden(input, cache, self.gradient_checkpointing),
            Arch::Gpt2(m) => m.forward_hidden(input, cache, self.gradient_checkpointing),
            Arch::Gemma3(m) => m.forward_hidden(input, cache, self.gradient_checkpointing),
            Arch::Phi3(m) => m.forward_hidden(input, cache, self.gradient_checkpointing),
        }
    }

    /// Output projection (v, c).
    pub fn lm_head(&self) -> &Tensor {
        match &self.arch {
            Arch::Llama(m) => m.lm_head(),
            Arch::Gpt2(m) => m.lm_head(),
            Arch::Gemma3(m) => m.lm_head(),
            Arch::Phi3(m) => m.lm_head(),
        }
    }

    /// The device this model's weights live on; its inputs are collated there.
    pub fn device(&self) -> &Device {
        self.lm_head().device()
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// A copy of this model whose parameters are fresh trainable variables (same names, same
    /// order), always f32 (or f64), whatever dtype this model holds its weights in. The
    /// original keeps its own storage, so it can serve as the frozen reference.
    pub fn to_trainable(&self) -> Result<(Decoder, Vec<(String, Var)>)> {
        let mut vars = Vec::with_capacity(self.params.len());
        let mut map = HashMap::new();
        for (name, t) in &self.params {
            let var = Var::from_tensor(&frozen_dtype::upcast(t)?)?;
            map.insert(name.clone(), var.as_tensor().clone());
            vars.push((name.clone(), var));
        }
        let weights = Weights::new(map, Path::new("<trainable copy>").to_path_buf());
        let model = Decoder::from_weights(self.config.clone(), &weights)?;
        Ok((model, vars))
    }

    /// The same weights without gradient tracking (shares storage; sees later updates).
    pub fn frozen_view(config: &ModelConfig, vars: &[(String, Var)]) -> Result<Decoder> {
        let map = vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        let weights = Weights::new(map, Path::new("<frozen view>").to_path_buf());
        Decoder::from_weights(config.clone(), &weights)
    }

    /// A frozen copy with the same parameter values as `vars` at this moment.
    pub fn snapshot(config: &ModelConfig, vars: &[(String, Var)]) -> Result<Decoder> {
        let mut map = HashMap::new();
        for (name, var) in vars {
            map.insert(name.clone(), var.as_tensor().detach().copy()?);
        }
        let weights = Weights::new(map, Path::new("<snapshot>").to_path_buf());
        Decoder::from_weights(config.clone(), &weights)
    }
}
