//! The model being trained and its reference, for full fine-tuning or LoRA.
//! Full: the policy is a trainable copy; the reference is the original weights.
//! LoRA: one copy of the base weights serves as the frozen backbone and — adapter off — as
//! the reference (or, continuing an `--adapter`, base + that adapter as it was at the start);
//! only the adapter is trainable and has optimizer state.

use candle_core::{Device, Var};

use super::config::TrainConfig;
use crate::error::Result;
use crate::model::lora::{
    frozen, init_adapters, load_adapter, select_targets, vars_from_adapters, AdapterConfig,
    TargetModules,
};
use crate::model::lora_targets::{module_paths, saved_target_modules};
use crate::model::{Decoder, Family};

pub struct Policy {
    /// Forward with gradients.
    pub model: Decoder,
    /// The same current weights without gradient tracking (eval, KTO's KL estimate).
    pub frozen: Decoder,
    /// Trainable tensors under the names they are saved with (HF or PEFT).
    pub vars: Vec<(String, Var)>,
    /// The frozen reference model.
    pub reference: Decoder,
    /// Set for LoRA runs: how the adapter is saved.
    pub adapter_config: Option<AdapterConfig>,
}

/// PEFT's default targets per architecture (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
fn default_targets(base: &Decoder) -> TargetModules {
    TargetModules::List(match base.config.family {
        Family::Llama | Family::Gemma3 => vec!["q_proj".into(), "v_proj".into()],
        // PEFT has no default for Phi-3; its fused qkv_proj covers what q_proj/v_proj do elsewhere.
        Family::Phi3 => vec!["qkv_proj".into()],
        Family::Gpt2 => vec!["c_attn".into()],
    })
}

/// The policy and reference for `cfg`; the policy checkpoints its layers when
/// `gradient_checkpointing` is on (the reference and the frozen view never build a graph).
pub fn build_policy(cfg: &TrainConfig, base: Decoder, device: &Device) -> Result<Policy> {
    let mut policy = build(cfg, base, device)?;
    policy
        .model
        .set_gradient_checkpointing(cfg.gradient_checkpointing);
    Ok(policy)
}

fn build(cfg: &TrainConfig, base: Decoder, device: &Device) -> Result<Policy> {
    if !cfg.use_peft {
        let (model, vars) = base.to_trainable()?;
        let frozen = Decoder::frozen_view(&model.config, &vars)?;
        return Ok(Policy {
            model,
            frozen,
            vars,
            reference: base,
            adapter_config: None,
        });
    }
    let modules = base.linear_modules().to_vec();
    let (vars, adapters, reference, config) = match &cfg.adapter {
        Some(dir) => {
            let (config, loaded) = load_adapter(dir, &modules, device)?;
            let (vars, adapters) = vars_from_adapters(&loaded)?;
            (vars, adapters, base.with_adapters(&loaded)?, config)
        }
        None => {
            let targets = match &cfg.lora_target_modules {
                Some(text) => TargetModules::from_cli(text),
                None => default_targets(&base),
            };
            let picked = select_targets(&modules, &targets)?;
            let all_modules = module_paths(base.params().iter().map(|(n, _)| n));
            let saved_targets = saved_target_modules(&targets, &picked, &all_modules);
            let (vars, adapters) = init_adapters(
                &picked,
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.lora_dropout,
                cfg.seed,
                device,
            )?;
            let config = AdapterConfig {
                peft_type: "LORA".into(),
                r: cfg.lora_r,
                lora_alpha: cfg.lora_alpha,
                lora_dropout: cfg.lora_dropout,
                target_modules: saved_targets,
                fan_in_fan_out: base.config.family == Family::Gpt2,
                bias: "none".into(),
                task_type: Some("CAUSAL_LM".into()),
                base_model_name_or_path: Some(cfg.model.display().to_string()),
                inference_mode: true,
                use_rslora: false,
            };
            (
                vars,
                adapters,
                base.with_adapters(&Default::default())?,
                config,
            )
        }
    };
    let model = base.with_adapters(&adapters)?;
    let frozen_model = base.with_adapters(&frozen(&adapters))?;
    Ok(Policy {
        model,
        frozen: frozen_model,
        vars,
        reference,
        adapter_config: Some(config),
    })
}

impl Policy {
    pub fn trainable_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}
