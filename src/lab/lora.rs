//! Lab `lora`: LoRA (Hu et al. 2021) trains a few low-rank adapter tensors on a frozen base,
//! and that one frozen copy of the base also serves as the DPO reference (adapter off).
//!
//! Measured, not assumed: a short full DPO run and a short LoRA DPO run from the same SFT
//! reference; then, for each setup, three steps of `leash dpo`'s own update on one batch, with
//! - the actual GradStore inspected: which tensors received a gradient (none of the base's);
//! - the base weights' bytes compared before and after the steps;
//! - the bytes each setup keeps resident, counted from the live objects: distinct weight
//!   storages (policy, its frozen view and the reference, shared buffers counted once), the
//!   gradients of the trainable tensors, and AdamW's two moments.
//!
//! Peak RSS is not measured here: one process cannot separate two setups' peaks (VmHWM only
//! grows); `leash bench --what dpo` vs `--what dpo-lora`, as separate processes, does that
//! (BENCHMARKS.md).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{CpuStorage, Storage, Tensor};

use super::{last_metric, plot, Lab};
use crate::demo::run_args;
use crate::error::Result;
use crate::eval::evaluate::load_policy;
use crate::report::plot::metric_series;
use crate::train::config::{resolve, Method, TrainArgs};
use crate::train::examples::{prepare, TrainExample};
use crate::train::metrics::Accumulator;
use crate::train::policy::build_policy;
use crate::train::step::{micro_batch, Reference, StepContext};
use crate::train::trainer::train;
use crate::train::update::{adamw, fixed_lr_step};

const LORA_R: usize = 4;
const LORA_ALPHA: f64 = 8.0;
/// LoRA moves fewer, freshly initialised parameters: the usual practice is a ~10× larger lr.
const LORA_LR_FACTOR: f64 = 10.0;
const HAND_STEPS: usize = 3;
const PAIRS: usize = 8;
const BYTES_PER_F32: usize = 4;

/// What one setup (full or LoRA) kept and touched during [`HAND_STEPS`] DPO steps.
struct Footprint {
    /// Parameters in the base model.
    total: usize,
    /// Trainable parameters.
    trainable: usize,
    /// What they should be: every parameter (full), r·(in + out) per linear module (LoRA).
    predicted_trainable: usize,
    /// Distinct weight buffers alive: policy, frozen view, reference, trainable tensors.
    weight_bytes: usize,
    /// Gradients of the trainable tensors (GradStore entries for them).
    grad_bytes: usize,
    /// GradStore entries for anything else: non-trainable inputs touched by an op.
    other_grad_bytes: usize,
    other_grad_entries: usize,
    /// AdamW's first and second moments.
    optimizer_bytes: usize,
    /// GradStore entries that are a base weight, or weight-shaped (a frozen matmul operand).
    base_grad_entries: usize,
    /// Trainable tensors with no gradient.
    missing_grads: usize,
    /// Every base weight's bytes identical after the steps.
    base_unchanged: bool,
    /// Every trainable tensor moved.
    all_trainable_moved: bool,
}

impl Footprint {
    fn resident(&self) -> usize {
        self.weight_bytes + self.grad_bytes + self.optimizer_bytes
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Bytes of the distinct CPU buffers behind `tensors` (a buffer shared by several tensors
/// counts once).
fn distinct_bytes<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> usize {
    let mut seen = HashMap::new();
    for (i, t) in tensors.enumerate() {
        let (storage, _) = t.storage_and_layout();
        let (key, bytes) = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => (v.as_ptr() as usize, v.len() * BYTES_PER_F32),
            // Not expected here (the demo is f32 on CPU): count each such tensor on its own.
            _ => (usize::MAX - i, t.elem_count() * t.dtype().size_in_bytes()),
        };
        seen.insert(key, bytes);
    }
    seen.values().sum()
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

impl Lab {
    fn lora_args(&self, out: &Path, lora: bool) -> TrainArgs {
        let lr = self.cfg.dpo_lr * if lora { LORA_LR_FACTOR } else { 1.0 };
        let mut a = run_args(
            &self.cfg,
            &self.reference,
            self.data.join("pref_train.jsonl"),
            out,
            self.cfg.dpo_steps,
            lr,
        );
        a.beta = Some(0.1);
        a.lr_scheduler_type = Some("constant".into());
        a.logging_steps = Some(5);
        if lora {
            a.use_peft = Some(true);
            a.lora_r = Some(LORA_R);
            a.lora_alpha = Some(LORA_ALPHA);
            a.lora_dropout = Some(0.0);
            a.lora_target_modules = Some("all-linear".into());
        }
        a
    }

    /// The first [`PAIRS`] training pairs and the tokenizer's padding id.
    fn pair_examples(&self) -> Result<(Vec<TrainExample>, u32)> {
        let (_, tok) = load_policy(&self.reference, None, &self.device)?;
        let prepared = prepare(
            Method::Dpo,
            &self.data.join("pref_train.jsonl"),
            &tok,
            64,
            PAIRS,
        )?;
        let pairs = prepared.examples.into_iter().take(PAIRS);
        Ok((pairs.map(|(_, ex)| ex).collect(), tok.pad_id))
    }

    /// [`HAND_STEPS`] steps of `leash dpo`'s own update of one setup on `pairs`, measured.
    fn footprint(
        &self,
        lora: bool,
        (pairs, pad_id): &(Vec<TrainExample>, u32),
    ) -> Result<Footprint> {
        let cfg = resolve(Method::Dpo, &self.lora_args(&self.dir.join("hand"), lora))?;
        let (base, _) = load_policy(&self.reference, None, &self.device)?;
        let total = base.num_parameters();
        let predicted_trainable = if lora {
            base.linear_modules()
                .iter()
                .map(|m| LORA_R * (m.inp + m.out))
                .sum()
        } else {
            total
        };
        let before: Vec<Vec<f32>> = base
            .params()
            .iter()
            .map(|(_, t)| values(t))
            .collect::<Result<_>>()?;
        let mut weight_shapes: HashSet<Vec<usize>> = HashSet::new();
        for (_, t) in base.params() {
            if t.rank() == 2 {
                weight_shapes.insert(t.dims().to_vec());
                weight_shapes.insert(t.t()?.dims().to_vec());
            }
        }
        let policy = build_policy(&cfg, base, &self.device)?;
        let trainable_before: Vec<Vec<f32>> = policy
            .vars
            .iter()
            .map(|(_, v)| values(v.as_tensor()))
            .collect::<Result<_>>()?;
        let micro = vec![pairs.iter().enumerate().collect::<Vec<_>>()];
        let ctx = StepContext {
            cfg: &cfg,
            policy: &policy.model,
            policy_frozen: &policy.frozen,
            reference: Reference::Model(&policy.reference),
            pad_id: *pad_id,
            device: &self.device,
        };
        let mut opt = adamw(&cfg, &policy.vars);
        let var_ids: HashSet<_> = policy.vars.iter().map(|(_, v)| v.id()).collect();
        let base_ids: HashSet<_> = policy
            .reference
            .params()
            .iter()
            .map(|(_, t)| t.id())
            .collect();
        let (mut grad_bytes, mut other_grad_bytes, mut other_grad_entries) = (0, 0, 0);
        let mut base_grad_entries = 0;
        // What the first step's backward touches: the GradStore of the same loss.
        let store = micro_batch(&ctx, &micro[0], 1.0, 0.0)?.loss.backward()?;
        for id in store.get_ids() {
            let Some(g) = store.get_id(*id) else { continue };
            let bytes = g.elem_count() * g.dtype().size_in_bytes();
            if var_ids.contains(id) {
                grad_bytes += bytes;
            } else {
                other_grad_bytes += bytes;
                other_grad_entries += 1;
                if base_ids.contains(id) || weight_shapes.contains(g.dims()) {
                    base_grad_entries += 1;
                }
            }
        }
        let missing_grads = policy
            .vars
            .iter()
            .filter(|(_, v)| store.get(v).is_none())
            .count();
        drop(store);
        let mut metrics = Accumulator::default();
        for step in 0..HAND_STEPS {
            fixed_lr_step(&ctx, &policy.vars, &mut opt, &micro, step, &mut metrics)?;
        }
        let after: Vec<Vec<f32>> = policy
            .reference
            .params()
            .iter()
            .map(|(_, t)| values(t))
            .collect::<Result<_>>()?;
        let base_unchanged = before.len() == after.len()
            && before.iter().zip(&after).all(|(a, b)| {
                a.iter()
                    .map(|x| x.to_bits())
                    .eq(b.iter().map(|x| x.to_bits()))
            });
        let mut all_trainable_moved = true;
        for ((_, v), b) in policy.vars.iter().zip(&trainable_before) {
            all_trainable_moved &= values(v.as_tensor())? != *b;
        }
        let weight_bytes = distinct_bytes(
            policy
                .model
                .params()
                .iter()
                .chain(policy.frozen.params())
                .chain(policy.reference.params())
                .map(|(_, t)| t)
                .chain(policy.vars.iter().map(|(_, v)| v.as_tensor())),
        );
        let optimizer_bytes = opt
            .moments
            .iter()
            .map(|m| m.elements() * BYTES_PER_F32)
            .sum();
        Ok(Footprint {
            total,
            trainable: policy.trainable_parameters(),
            predicted_trainable,
            weight_bytes,
            grad_bytes,
            other_grad_bytes,
            other_grad_entries,
            optimizer_bytes,
            base_grad_entries,
            missing_grads,
            base_unchanged,
            all_trainable_moved,
        })
    }

    fn timed_run(&self, name: &str, lora: bool) -> Result<(PathBuf, f64)> {
        let out = self.dir.join(name);
        let t = Instant::now();
        train(&resolve(Method::Dpo, &self.lora_args(&out, lora))?)?;
        Ok((out, t.elapsed().as_secs_f64()))
    }

    /// Full vs LoRA DPO: what trains, what stays frozen, and what each keeps in memory.
    pub(super) fn lora(&self) -> Result<(String, bool, String)> {
        let (full_run, full_s) = self.timed_run("full", false)?;
        let (lora_run, lora_s) = self.timed_run("lora", true)?;
        let pairs = self.pair_examples()?;
        let full = self.footprint(false, &pairs)?;
        let lora = self.footprint(true, &pairs)?;

        // What the accounting predicts from the parameter counts alone: full keeps policy,
        // reference, gradient and two moments per parameter; LoRA keeps the base once and
        // the adapter with its gradient and two moments.
        let word = BYTES_PER_F32;
        let expect_full = 5 * full.total * word;
        let expect_lora = lora.total * word + 4 * lora.trainable * word;
        let loss_of = |run: &Path| -> Result<f64> {
            Ok(last_metric(&run.join("metrics.jsonl"), "loss")?.unwrap_or(f64::NAN))
        };
        let (full_loss, lora_loss) = (loss_of(&full_run)?, loss_of(&lora_run)?);
        let fraction = lora.trainable as f64 / lora.total as f64;
        let checks = [
            ("no base weight got a gradient", lora.base_grad_entries == 0),
            (
                "every adapter tensor got a gradient",
                lora.missing_grads == 0,
            ),
            ("base bytes unchanged after LoRA steps", lora.base_unchanged),
            ("every adapter tensor moved", lora.all_trainable_moved),
            ("full DPO's reference unchanged", full.base_unchanged),
            ("every full-DPO weight moved", full.all_trainable_moved),
            (
                "trainable = r·(in + out) per linear module",
                lora.trainable == lora.predicted_trainable,
            ),
            (
                "full DPO trains every parameter",
                full.trainable == full.predicted_trainable,
            ),
            ("under 10 % of parameters trainable", fraction < 0.1),
            (
                "LoRA keeps fewer bytes resident",
                lora.resident() < full.resident(),
            ),
            (
                "full resident bytes = 5 × weights",
                full.resident() == expect_full,
            ),
            (
                "LoRA resident bytes = base + 4 × adapter",
                lora.resident() == expect_lora,
            ),
            (
                "LoRA DPO run lowered the loss below ln 2",
                lora_loss < std::f64::consts::LN_2,
            ),
        ];
        let failed: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
        let ok = failed.is_empty();
        let verdict = format!(
            "LoRA r {LORA_R} trains {} of {} parameters ({:.1} %); its backward gave {} base weights a gradient; resident weights+grads+AdamW {:.2} MiB vs {:.2} MiB for full DPO ({:.0} %) — {}",
            lora.trainable,
            lora.total,
            100.0 * fraction,
            lora.base_grad_entries,
            mib(lora.resident()),
            mib(full.resident()),
            100.0 * lora.resident() as f64 / full.resident() as f64,
            if ok {
                "reproduced: a frozen base, one copy serving as backbone and reference".to_string()
            } else {
                format!("NOT reproduced: {}", failed.join("; "))
            }
        );
        let mut body = format!(
            "Same SFT reference, same data, {} steps each; LoRA r = {LORA_R}, α = {LORA_ALPHA}, every linear layer, lr ×{LORA_LR_FACTOR}. \
             Bytes are counted from the live tensors after {HAND_STEPS} DPO steps on {PAIRS} pairs (buffers shared between policy, frozen view and reference count once).\n\n\
             | | full DPO | LoRA DPO |\n|---|---|---|\n",
            self.cfg.dpo_steps
        );
        let row = |b: &mut String, name: &str, f: String, l: String| {
            let _ = writeln!(b, "| {name} | {f} | {l} |");
        };
        let m = |x: usize| format!("{:.3} MiB", mib(x));
        row(
            &mut body,
            "trainable / total parameters",
            format!("{} / {}", full.trainable, full.total),
            format!("{} / {}", lora.trainable, lora.total),
        );
        row(
            &mut body,
            "weights (policy + reference, distinct buffers)",
            m(full.weight_bytes),
            m(lora.weight_bytes),
        );
        row(
            &mut body,
            "gradients of trainable tensors",
            m(full.grad_bytes),
            m(lora.grad_bytes),
        );
        row(
            &mut body,
            "AdamW moments",
            m(full.optimizer_bytes),
            m(lora.optimizer_bytes),
        );
        row(
            &mut body,
            "**resident total**",
            m(full.resident()),
            m(lora.resident()),
        );
        row(
            &mut body,
            "predicted from parameter counts",
            m(expect_full),
            m(expect_lora),
        );
        row(
            &mut body,
            "other GradStore entries (non-trainable op inputs, e.g. the attention mask)",
            format!("{} ({})", full.other_grad_entries, m(full.other_grad_bytes)),
            format!("{} ({})", lora.other_grad_entries, m(lora.other_grad_bytes)),
        );
        row(
            &mut body,
            "weight-shaped gradients of frozen tensors",
            "—".into(),
            lora.base_grad_entries.to_string(),
        );
        row(
            &mut body,
            "base/reference bytes unchanged",
            full.base_unchanged.to_string(),
            lora.base_unchanged.to_string(),
        );
        row(
            &mut body,
            "final training loss",
            format!("{full_loss:.4}"),
            format!("{lora_loss:.4}"),
        );
        row(
            &mut body,
            "wall time of the run",
            format!("{full_s:.1} s"),
            format!("{lora_s:.1} s"),
        );
        body += "\nChecks:\n\n";
        for (name, pass) in &checks {
            let _ = writeln!(body, "- [{}] {name}", if *pass { "x" } else { " " });
        }
        body += "\nActivations are not in this table: they depend on batch × length, not on the method, and dominate on small models. Peak RSS of full vs LoRA DPO is measured by `leash bench --what dpo` / `--what dpo-lora` in separate processes (BENCHMARKS.md).\n\n";
        let mut series = metric_series(&full_run.join("metrics.jsonl"), &["loss"])?;
        series
            .iter_mut()
            .for_each(|s| s.name = "full DPO loss".into());
        let mut lora_series = metric_series(&lora_run.join("metrics.jsonl"), &["loss"])?;
        lora_series
            .iter_mut()
            .for_each(|s| s.name = "LoRA DPO loss".into());
        series.extend(lora_series);
        body += &plot(
            &self.dir.join("loss.png"),
            "DPO loss: full vs LoRA",
            "step",
            "loss",
            &series,
        );
        Ok((verdict, ok, body))
    }
}
