//! Gradient checkpointing (`--gradient-checkpointing`) is exact: on every model family, for
//! full fine-tuning and for LoRA (with dropout, whose masks the rerun must replay), the
//! gradients of a weighted sum of sequence log-probs equal those with checkpointing off, and
//! every trainable tensor gets one; with the flag on, backward reruns every decoder layer (a
//! family that ignored the flag would give the same gradients, so this is counted too).
//! Reference: the same computation without checkpointing (itself checked against finite
//! differences in tests/gradients.rs); and a one-step DPO run with and without the flag logs
//! the same metrics.

mod common;
use candle_core::{Device, Tensor, Var};
use common::fixture;
use leash::data::collate::collate;
use leash::data::encode::Sequence;
use leash::loss::logps::score;
use leash::model::checkpoint;
use leash::model::linear::dropout_tape;
use leash::model::lora::{init_adapters, select_targets, TargetModules};
use leash::model::Decoder;

const FAMILIES: [&str; 7] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gpt2",
    "tiny-gpt2-untied",
    "tiny-gemma3",
    "tiny-phi3",
];

/// Decoder layers of each fixture (its config.json) and the linear modules of one layer, by
/// the checkpoint's tensor names: what `all-linear` must target (PEFT: every linear layer but
/// the output head).
fn layers_and_linears(family: &str) -> (usize, Vec<String>) {
    let llama = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ]
    .into_iter()
    .chain(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]);
    let (n, prefix, names): (usize, &str, Vec<&str>) = match family {
        "tiny-llama" | "tiny-qwen2" | "tiny-qwen3" => (2, "model.layers", llama.collect()),
        "tiny-gemma3" => (4, "model.layers", llama.collect()),
        "tiny-gpt2" | "tiny-gpt2-untied" => (
            2,
            "transformer.h",
            vec!["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        ),
        "tiny-phi3" => (
            2,
            "model.layers",
            vec![
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.gate_up_proj",
                "mlp.down_proj",
            ],
        ),
        other => panic!("no layer table for {other}"),
    };
    let mut paths: Vec<String> = (0..n)
        .flat_map(|l| names.iter().map(move |m| format!("{prefix}.{l}.{m}")))
        .collect();
    paths.sort();
    (n, paths)
}

fn batch() -> leash::data::collate::Collated {
    let seqs = [
        Sequence {
            ids: vec![1, 40, 41, 42, 43, 44, 45, 46, 2],
            loss_start: 3,
        },
        Sequence {
            ids: vec![1, 50, 60, 70, 80, 2],
            loss_start: 2,
        },
        // 15 tokens: longer than the sliding windows of tiny-gemma3 (12) and tiny-phi3 (10),
        // so their windowed masks differ from the causal one.
        Sequence {
            ids: vec![1, 9, 8, 7, 6, 5, 4, 3, 30, 31, 32, 33, 34, 35, 2],
            loss_start: 6,
        },
    ];
    let refs: Vec<&Sequence> = seqs.iter().collect();
    collate(&refs, 0, None, &[], &Device::Cpu).unwrap()
}

/// Gradients of 1.5·lp₀ − lp₁ + 0.5·lp₂ for every variable (panics if one has none).
fn grads(model: &Decoder, vars: &[(String, Var)]) -> Vec<Tensor> {
    let lp = score(model, &batch()).unwrap().seq_logps;
    let w = Tensor::new(&[1.5f32, -1.0, 0.5], &Device::Cpu).unwrap();
    let store = checkpoint::backward(&(lp * w).unwrap().sum_all().unwrap()).unwrap();
    vars.iter()
        .map(|(name, v)| {
            store
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .clone()
        })
        .collect()
}

fn assert_same(off: &[Tensor], on: &[Tensor], vars: &[(String, Var)], what: &str) {
    for ((a, b), (name, _)) in off.iter().zip(on).zip(vars) {
        let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff <= 1e-6 * scale.max(1e-3),
            "{what} {name}: max |off − on| = {diff} (scale {scale})"
        );
    }
}

#[test]
fn full_fine_tuning_gradients_are_unchanged() {
    for family in FAMILIES {
        let base = Decoder::load(&fixture(family), &Device::Cpu).unwrap();
        let (mut model, vars) = base.to_trainable().unwrap();
        let off = grads(&model, &vars);
        assert_eq!(checkpoint::last_backward_reruns(), 0, "{family}: flag off");
        model.set_gradient_checkpointing(true);
        let on = grads(&model, &vars);
        let (layers, _) = layers_and_linears(family);
        assert_eq!(
            checkpoint::last_backward_reruns(),
            layers,
            "{family}: layers rerun"
        );
        assert_same(&off, &on, &vars, family);
    }
}

/// LoRA on every linear layer, B made non-zero (so A's gradient is too), dropout 0.1: the
/// off run records its dropout masks and the checkpointed run is handed the same ones.
#[test]
fn lora_gradients_with_dropout_are_unchanged() {
    for family in FAMILIES {
        let base = Decoder::load(&fixture(family), &Device::Cpu).unwrap();
        let modules = base.linear_modules().to_vec();
        let targets = select_targets(&modules, &TargetModules::from_cli("all-linear")).unwrap();
        let mut picked: Vec<String> = targets.iter().map(|m| m.path.clone()).collect();
        picked.sort();
        let (layers, linears) = layers_and_linears(family);
        assert_eq!(picked, linears, "{family}: all-linear targets");
        let (vars, adapters) = init_adapters(&targets, 4, 8.0, 0.1, 7, &Device::Cpu).unwrap();
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let mut model = base.with_adapters(&adapters).unwrap();
        let (off, masks) = dropout_tape::record(|| Ok(grads(&model, &vars))).unwrap();
        assert!(!masks.is_empty(), "{family}: dropout drew no mask");
        model.set_gradient_checkpointing(true);
        let on = dropout_tape::replay(&masks, || Ok(grads(&model, &vars))).unwrap();
        assert_eq!(
            checkpoint::last_backward_reruns(),
            layers,
            "{family}: layers rerun"
        );
        assert_same(&off, &on, &vars, family);
        let lp = score(&model, &batch())
            .unwrap()
            .seq_logps
            .sum_all()
            .unwrap();
        let store = checkpoint::backward(&lp).unwrap();
        for (name, w) in base.params() {
            assert!(
                store.get(w).is_none(),
                "{family}: base weight {name} got a gradient"
            );
        }
    }
}

/// The other way round, at dropout 0.5: the masks a checkpointed run drew (its reruns in
/// backward must replay them), handed to a run without checkpointing, give its gradients.
#[test]
fn rerun_replays_its_own_dropout_masks() {
    let base = Decoder::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let (mut model, vars) = common::lora::all_linear_lora(&base, 0.5);
    model.set_gradient_checkpointing(true);
    // Record the checkpointed run's masks, then run it without checkpointing on those masks.
    let (on, masks) = dropout_tape::record(|| Ok(grads(&model, &vars))).unwrap();
    model.set_gradient_checkpointing(false);
    let off = dropout_tape::replay(&masks, || Ok(grads(&model, &vars))).unwrap();
    assert_same(&off, &on, &vars, "tiny-llama, p 0.5");
}
