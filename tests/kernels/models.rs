//! Whole models with the composed path forced (`kernels::force_composed`), on the CPU: what
//! a GPU runs. One DPO step (TRL's sigmoid loss, β 0.1, live reference) on each family's
//! fixture, full fine-tuning and LoRA on every linear layer with dropout (one seed, so both
//! paths draw the same masks): the log-probs, the loss and every trainable tensor's gradient
//! equal the default (fused CPU) path's, and no frozen tensor gets a gradient on either.
//! Then gradient checkpointing on the composed path: the same step with and without it.

use candle_core::{Device, Tensor, Var};
use leash::data::collate::collate;
use leash::data::encode::Sequence;
use leash::kernels;
use leash::loss::dpo::{dpo_loss, DpoLossType, DpoOptions, PairLogps};
use leash::loss::logps::score;
use leash::model::linear::seed_dropout;
use leash::model::lora::{init_adapters, select_targets, TargetModules};
use leash::model::{checkpoint, Decoder};

use super::common::fixture;
use super::{max_abs_diff, rel_diff};

const FAMILIES: [&str; 5] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gpt2",
    "tiny-gemma3",
    "tiny-phi3",
];

/// Composed vs fused: summed sequence log-probs and the loss (absolute), gradients (relative
/// to the tensor's largest entry). f32 over a few layers stays orders of magnitude below.
const PATH_TOL: f64 = 1e-4;
/// Checkpointing on vs off: the same computation, so as tight as tests/gradient_checkpointing.rs.
const CKPT_TOL: f64 = 1e-6;

/// Two pairs sharing prompts; the second prompt + completion is 15 tokens, past the sliding
/// windows of tiny-gemma3 (12) and tiny-phi3 (10). Rows: chosen 0, chosen 1, rejected 0, 1.
fn pairs() -> leash::data::collate::Collated {
    let seq = |ids: Vec<u32>, loss_start| Sequence { ids, loss_start };
    let seqs = [
        seq(vec![1, 40, 41, 42, 43, 44, 45, 2], 3),
        seq(vec![1, 9, 8, 7, 6, 5, 4, 3, 30, 31, 32, 33, 34, 35, 2], 6),
        seq(vec![1, 40, 41, 50, 51, 2], 3),
        seq(vec![1, 9, 8, 7, 6, 5, 4, 3, 60, 61, 2], 6),
    ];
    let refs: Vec<&Sequence> = seqs.iter().collect();
    collate(&refs, 0, None, &[], &Device::Cpu).unwrap()
}

/// A policy to train, the frozen reference, and which tensors must get no gradient.
struct Setup {
    policy: Decoder,
    reference: Decoder,
    vars: Vec<(String, Var)>,
    frozen: Vec<(String, Tensor)>,
}

fn setup(family: &str, lora: bool) -> Setup {
    let base = Decoder::load(&fixture(family), &Device::Cpu).unwrap();
    let frozen = base.params().to_vec();
    let (policy, vars) = if lora {
        let modules = base.linear_modules().to_vec();
        let targets = select_targets(&modules, &TargetModules::from_cli("all-linear")).unwrap();
        let (vars, adapters) = init_adapters(&targets, 4, 8.0, 0.1, 7, &Device::Cpu).unwrap();
        // B = 0 at init; a non-zero B gives A a gradient too.
        for (name, v) in &vars {
            if name.contains("lora_B") {
                v.set(&super::noise(v.dims(), 0.1, 3)).unwrap();
            }
        }
        (base.with_adapters(&adapters).unwrap(), vars)
    } else {
        base.to_trainable().unwrap()
    };
    Setup {
        policy,
        reference: base,
        vars,
        frozen,
    }
}

struct Step {
    /// (4,) policy and reference summed log-probs.
    logps: Tensor,
    ref_logps: Tensor,
    loss: Tensor,
    grads: Vec<Tensor>,
}

/// One DPO step's loss and gradients (dropout seeded as the trainer seeds it at step 0).
fn dpo_step(s: &Setup, what: &str) -> Step {
    seed_dropout(42, 0);
    let batch = pairs();
    let pol = score(&s.policy, &batch).unwrap();
    let logps = pol.seq_logps;
    let ref_logps = score(&s.reference, &batch).unwrap().seq_logps.detach();
    let tokens: Vec<f32> = pol.seq_tokens.iter().map(|&n| n as f32).collect();
    let tokens = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap();
    let half = |t: &Tensor, i: usize| t.narrow(0, 2 * i, 2).unwrap();
    let (c, r, rc, rr) = (
        half(&logps, 0),
        half(&logps, 1),
        half(&ref_logps, 0),
        half(&ref_logps, 1),
    );
    let (ct, rt) = (half(&tokens, 0), half(&tokens, 1));
    let pair = PairLogps {
        chosen: &c,
        rejected: &r,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_tokens: &ct,
        rejected_tokens: &rt,
    };
    let options = DpoOptions {
        beta: 0.1,
        loss_type: DpoLossType::Sigmoid,
        label_smoothing: 0.0,
    };
    let loss = dpo_loss(&pair, &options).unwrap().loss;
    let store = checkpoint::backward(&loss).unwrap();
    for (name, t) in &s.frozen {
        assert!(
            store.get(t).is_none(),
            "{what}: frozen {name} got a gradient"
        );
    }
    let grads = s
        .vars
        .iter()
        .map(|(name, v)| {
            let g = store
                .get(v)
                .unwrap_or_else(|| panic!("{what}: {name} has no gradient"));
            assert!(
                super::max_abs(g) > 0.0,
                "{what}: {name} has a zero gradient"
            );
            g.clone()
        })
        .collect();
    Step {
        logps: logps.detach(),
        ref_logps,
        loss: loss.detach(),
        grads,
    }
}

fn assert_close(a: &Step, b: &Step, vars: &[(String, Var)], tol: f64, what: &str) {
    for (x, y, name) in [
        (&a.logps, &b.logps, "policy log-probs"),
        (&a.ref_logps, &b.ref_logps, "reference log-probs"),
        (&a.loss, &b.loss, "loss"),
    ] {
        let d = max_abs_diff(x, y);
        assert!(d <= tol, "{what}: {name} differ by {d:e}");
    }
    for ((x, y), (name, _)) in a.grads.iter().zip(&b.grads).zip(vars) {
        let d = rel_diff(x, y, 1e-6);
        assert!(
            d <= tol,
            "{what}: gradient of {name} differs by {d:e} (relative)"
        );
    }
}

fn composed_step(s: &Setup, what: &str) -> Step {
    let _composed = kernels::force_composed(true);
    dpo_step(s, what)
}

#[test]
fn dpo_step_on_the_composed_path_equals_the_fused_path() {
    for family in FAMILIES {
        for lora in [false, true] {
            let what = format!("{family} (lora {lora})");
            let s = setup(family, lora);
            let fused = dpo_step(&s, &what);
            let composed = composed_step(&s, &what);
            assert_close(&fused, &composed, &s.vars, PATH_TOL, &what);
        }
    }
}

#[test]
fn gradient_checkpointing_is_exact_on_the_composed_path() {
    for family in FAMILIES {
        for lora in [false, true] {
            let what = format!("{family} (lora {lora}, composed)");
            let mut s = setup(family, lora);
            let off = composed_step(&s, &what);
            assert_eq!(checkpoint::last_backward_reruns(), 0, "{what}: flag off");
            s.policy.set_gradient_checkpointing(true);
            let on = composed_step(&s, &what);
            let layers = s.policy.config.num_hidden_layers;
            assert_eq!(
                checkpoint::last_backward_reruns(),
                layers,
                "{what}: layers rerun"
            );
            assert_close(&off, &on, &s.vars, CKPT_TOL, &what);
        }
    }
}
