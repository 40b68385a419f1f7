//! `leash lab grad`: One gradient step on the DPO loss raises chosen and lowers rejected log-probs;
//! the gradient matches a central finite difference along its own direction.

use candle_core::Tensor;

use super::{plot, Lab};
use crate::demo::run_args;
use crate::error::Result;
use crate::eval::evaluate::load_policy;
use crate::model::Decoder;
use crate::report::plot::Series;
use crate::train::config::{resolve, Method};
use crate::train::grads::GradAccumulator;
use crate::train::step::{micro_batch, Reference, StepContext};

const PAIRS: usize = 8;

impl Lab {
    pub(super) fn grad(&self) -> Result<(String, bool, String)> {
        let (base, tok) = load_policy(&self.reference, None, &self.device)?;
        // `leash dpo`'s own micro-batch (sigmoid loss, β 0.1) on 8 training pairs, against
        // the loaded SFT model as the reference.
        let mut args = run_args(
            &self.cfg,
            &self.reference,
            self.data.join("pref_train.jsonl"),
            &self.dir,
            1,
            // Unused: the lab steps by hand along the gradient.
            self.cfg.dpo_lr,
        );
        args.beta = Some(0.1);
        let cfg = resolve(Method::Dpo, &args)?;
        let prepared = crate::train::examples::prepare(
            Method::Dpo,
            &cfg.dataset,
            &tok,
            cfg.max_length,
            PAIRS,
        )?;
        let (policy, vars) = base.to_trainable()?;
        let pairs: Vec<_> = prepared
            .examples
            .iter()
            .take(PAIRS)
            .enumerate()
            .map(|(i, (_, ex))| (i, ex))
            .collect();
        // The loss and the mean chosen and rejected sequence log-probs at `m`'s weights.
        let loss_at = |m: &Decoder| -> Result<(Tensor, [f64; 2])> {
            let ctx = StepContext {
                cfg: &cfg,
                policy: m,
                policy_frozen: m,
                reference: Reference::Model(&base),
                pad_id: tok.pad_id,
                device: &self.device,
            };
            let out = micro_batch(&ctx, &pairs, 1.0, 0.0)?;
            let metric = |k: &str| {
                out.metrics
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map_or(f64::NAN, |(_, v)| *v)
            };
            Ok((out.loss, [metric("logps/chosen"), metric("logps/rejected")]))
        };
        let (loss, before) = loss_at(&policy)?;
        let grads = loss.backward()?;
        let g = GradAccumulator::of(&grads, &vars)?;
        let norm2: f64 = g
            .iter()
            .map(|t| {
                t.sqr()
                    .and_then(|s| s.sum_all())
                    .and_then(|s| s.to_scalar::<f32>())
                    .unwrap_or(0.0) as f64
            })
            .sum();
        let originals: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let shift = |scale: f64| -> Result<()> {
            for ((_, v), (o, gi)) in vars.iter().zip(originals.iter().zip(&g)) {
                v.set(&(o + (gi * scale)?)?)?;
            }
            Ok(())
        };
        let eps = 1e-3 / norm2.sqrt();
        shift(eps)?;
        let plus = loss_at(&policy)?.0.to_scalar::<f32>()? as f64;
        shift(-eps)?;
        let minus = loss_at(&policy)?.0.to_scalar::<f32>()? as f64;
        let numeric = (plus - minus) / (2.0 * eps); // directional derivative along g = |g|²
        let rel = (numeric - norm2).abs() / norm2.max(1e-12);
        let lr = 1e-3 / norm2.sqrt();
        shift(-lr)?;
        let after = loss_at(&policy)?.1;
        let (dc, dr) = (after[0] - before[0], after[1] - before[1]);
        let ok = dc > 0.0 && dr < 0.0 && rel < 5e-2;
        // The picture of the lesson: mean chosen and rejected log-probs along the line
        // θ − t·∇L/|∇L|, from a step against the gradient to several steps along it.
        let (mut chosen_line, mut rejected_line) = (Vec::new(), Vec::new());
        for t in [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0] {
            shift(-t * 1e-3 / norm2.sqrt())?;
            let lp = loss_at(&policy)?.1;
            chosen_line.push((t, lp[0]));
            rejected_line.push((t, lp[1]));
        }
        shift(0.0)?;
        let body_plot = plot(
            &self.dir.join("logps_vs_step.png"),
            "DPO: log-probs along the gradient step",
            "step length along −∇L (×1e-3)",
            "mean sequence log p (nats)",
            &[
                Series {
                    name: "chosen".into(),
                    points: chosen_line,
                },
                Series {
                    name: "rejected".into(),
                    points: rejected_line,
                },
            ],
        );
        let verdict = format!("one DPO gradient step moved chosen log-probs by {dc:+.3} and rejected by {dr:+.3}; analytic vs finite-difference directional derivative differ by {:.1} % — {}", rel * 100.0, if ok { "reproduced" } else { "NOT reproduced" });
        Ok((verdict, ok, format!("{PAIRS} pairs from the training set; step of length 1e-3 along −∇L; finite difference in f32 with ε·|∇L| = 1e-3.\n\n| | mean before | mean after |\n|---|---|---|\n| chosen log-prob | {:.3} | {:.3} |\n| rejected log-prob | {:.3} | {:.3} |\n\n{body_plot}", before[0], after[0], before[1], after[1])))
    }
}
