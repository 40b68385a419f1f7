//! One micro-batch of each method: collate, score policy (and reference), call the pure loss
//! function, and collect TRL's metrics. Returns the loss scaled for accumulation.
//!
//! Legend: p pairs/rows in the micro-batch, n scored tokens, c channels.

use std::collections::HashMap;

use candle_core::{Device, Tensor, D};

use super::config::{Method, TrainConfig};
use super::examples::{to_sequence, TrainExample};
use super::method_options::LossType;
use super::metrics::Accumulator;
use super::update::MicroLoss;
use crate::data::collate::{collate, retain_scored, Collated};
use crate::data::encode::{PromptCompletion, Sequence};
use crate::data::pack::collate_packed;
use crate::error::Result;
use crate::loss::dpo::{dpo_loss, DpoOptions, PairLogps};
use crate::loss::kto::{kto_loss, KtoOptions};
use crate::loss::logps::{score, score_with_stats, segment_sum};
use crate::loss::orpo::orpo_loss;
use crate::loss::token_logprob::RowStats;
use crate::model::frozen_dtype::upcast;
use crate::model::Decoder;

/// Reference log-probs of one example: (chosen, rejected) for pairs, (completion, KL) for KTO.
pub type RefLogps = (f32, f32);

/// Where reference log-probs come from.
pub enum Reference<'a> {
    /// A frozen model scored alongside the policy.
    Model(&'a Decoder),
    /// Scored once before training, keyed by example position.
    Cached(&'a HashMap<usize, RefLogps>),
    /// ORPO and SFT use none.
    None,
}

/// Named values for one micro-batch; a key appears only when the batch has it (e.g. KTO
/// batches without desirable rows have no `rewards/chosen`).
pub type Metrics = Vec<(&'static str, f64)>;

pub struct MicroOutput {
    /// Scalar loss already divided for accumulation; backward() this.
    pub loss: Tensor,
    pub metrics: Metrics,
    /// Non-padding tokens (TRL's `num_tokens` increment).
    pub tokens: usize,
}

pub struct StepContext<'a> {
    pub cfg: &'a TrainConfig,
    pub policy: &'a Decoder,
    /// The policy's weights without gradient tracking (for KTO's detached KL estimate).
    pub policy_frozen: &'a Decoder,
    pub reference: Reference<'a>,
    pub pad_id: u32,
    pub device: &'a Device,
}

fn sequences(pcs: &[&PromptCompletion], max_length: usize) -> Vec<Sequence> {
    pcs.iter().map(|pc| to_sequence(pc, max_length)).collect()
}

/// Collates `seqs`: padding-free (shared prompts, packed rows) unless prompt tokens are
/// scored (ORPO), whose metrics are defined on the padded layout.
fn batch(ctx: &StepContext, seqs: &[Sequence], score_prompt: &[bool]) -> Result<Collated> {
    let refs: Vec<&Sequence> = seqs.iter().collect();
    if ctx.cfg.padding_free && score_prompt.is_empty() {
        return Ok(collate_packed(
            &refs,
            ctx.pad_id,
            ctx.policy.config.sliding_window,
            true,
            ctx.device,
        )?);
    }
    Ok(collate(
        &refs,
        ctx.pad_id,
        ctx.policy.config.sliding_window,
        score_prompt,
        ctx.device,
    )?)
}

/// Per-token entropy, vocab-mean logit and top-1 hit, summed per group of sequences.
struct TokenSums {
    entropy: f64,
    logit: f64,
    hits: f64,
    count: f64,
}

fn token_sums(stats: &[RowStats], b: &Collated, in_group: impl Fn(usize) -> bool) -> TokenSums {
    let mut s = TokenSums {
        entropy: 0.0,
        logit: 0.0,
        hits: 0.0,
        count: 0.0,
    };
    for ((st, &seq), &inc) in stats.iter().zip(&b.seq_of).zip(&b.in_completion) {
        if inc && in_group(seq as usize) {
            s.entropy += st.entropy as f64;
            s.logit += st.mean_logit as f64;
            s.hits += st.argmax_hit as u8 as f64;
            s.count += 1.0;
        }
    }
    s
}

fn vec1(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.detach().to_vec1::<f32>()?)
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

/// Completion tokens SFT normalises the step's summed NLL by (TRL counts the whole step).
pub fn sft_token_count(micro: &[Vec<(usize, &TrainExample)>], max_length: usize) -> f64 {
    micro
        .iter()
        .flatten()
        .map(|(_, e)| match e {
            TrainExample::Sft(pc) => {
                // assistant_only_loss: only the tokens the loss mask keeps count.
                let s = to_sequence(pc, max_length);
                match pc.loss_mask {
                    None => s.scored_tokens(),
                    Some(_) => (s.loss_start.max(1)..s.ids.len())
                        .filter(|&p| pc.in_loss(p))
                        .count(),
                }
            }
            _ => 0,
        })
        .sum::<usize>() as f64
}

/// The losses of one optimizer step of the offline methods (SFT/DPO/KTO/ORPO) over the
/// micro-batches `micro`, as [`crate::train::update::update`] takes them: micro-batch `i`'s
/// [`micro_batch`], its metrics added to the step's.
pub fn offline_losses<'a>(
    ctx: &'a StepContext<'a>,
    micro: &'a [Vec<(usize, &'a TrainExample)>],
) -> impl FnMut(usize, &mut Accumulator) -> Result<MicroLoss> + 'a {
    let sft_tokens = sft_token_count(micro, ctx.cfg.max_length);
    let scale = 1.0 / micro.len().max(1) as f64;
    move |i, metrics| {
        let out = micro_batch(ctx, &micro[i], scale, sft_tokens)?;
        metrics.add(&out.metrics);
        Ok(MicroLoss {
            loss: out.loss,
            tokens: out.tokens,
        })
    }
}

/// Runs one micro-batch. `scale` divides the loss (1/accumulation steps); for SFT
/// `sft_tokens` is the completion-token count of the whole optimizer step (TRL normalises the
/// summed NLL by it).
pub fn micro_batch(
    ctx: &StepContext,
    examples: &[(usize, &TrainExample)],
    scale: f64,
    sft_tokens: f64,
) -> Result<MicroOutput> {
    match ctx.cfg.method {
        Method::Sft => sft(ctx, examples, sft_tokens),
        Method::Dpo => dpo(ctx, examples, scale),
        Method::Kto => kto(ctx, examples, scale),
        Method::Orpo => orpo(ctx, examples, scale),
        Method::Grpo => Err(crate::error::LeashError::usage(
            "GRPO has no offline micro-batch",
            "run it through leash::train::grpo::train",
        )),
    }
}

fn sft(
    ctx: &StepContext,
    examples: &[(usize, &TrainExample)],
    sft_tokens: f64,
) -> Result<MicroOutput> {
    let pcs: Vec<&PromptCompletion> = examples
        .iter()
        .filter_map(|(_, e)| match e {
            TrainExample::Sft(pc) => Some(pc),
            _ => None,
        })
        .collect();
    let seqs = sequences(&pcs, ctx.cfg.max_length);
    let mut b = batch(ctx, &seqs, &[])?;
    if pcs.iter().any(|pc| pc.loss_mask.is_some()) {
        // assistant_only_loss: only the assistant's tokens count (TRL's labels = -100 elsewhere).
        let refs: Vec<&Sequence> = seqs.iter().collect();
        retain_scored(&mut b, &refs, |s, p| pcs[s].in_loss(p))?;
    }
    let scored = score_with_stats(ctx.policy, &b)?;
    let loss = (scored.token_logps.sum_all()?.neg()? / sft_tokens.max(1.0))?;
    let s = token_sums(&scored.stats, &b, |_| true);
    Ok(MicroOutput {
        loss,
        metrics: vec![
            ("entropy", s.entropy / s.count.max(1.0)),
            ("mean_token_accuracy", s.hits / s.count.max(1.0)),
        ],
        tokens: b.n_tokens,
    })
}

/// Reference log-probs for the batch, as two (p,) tensors.
fn reference_logps(
    ctx: &StepContext,
    examples: &[(usize, &TrainExample)],
    b: &Collated,
    kl_batch: Option<&Collated>,
) -> Result<(Tensor, Tensor)> {
    let p = examples.len();
    match &ctx.reference {
        Reference::Model(reference) => {
            let main = score(reference, b)?.seq_logps;
            match kl_batch {
                Some(kb) => Ok((main, score(reference, kb)?.seq_logps)),
                None => Ok((main.narrow(0, 0, p)?, main.narrow(0, p, p)?)),
            }
        }
        Reference::Cached(cache) => {
            let mut a = Vec::with_capacity(p);
            let mut r = Vec::with_capacity(p);
            for (pos, _) in examples {
                let Some(&(x, y)) = cache.get(pos) else {
                    return Err(crate::error::LeashError::usage(
                        format!("the precomputed reference has no log-probs for example {pos}"),
                        "delete ref_logps_*.json in the output folder to recompute them",
                    ));
                };
                a.push(x);
                r.push(y);
            }
            Ok((
                Tensor::new(a.as_slice(), ctx.device)?,
                Tensor::new(r.as_slice(), ctx.device)?,
            ))
        }
        Reference::None => Ok((
            Tensor::zeros(p, candle_core::DType::F32, ctx.device)?,
            Tensor::zeros(p, candle_core::DType::F32, ctx.device)?,
        )),
    }
}

/// The pairs' chosen sequences stacked above their rejected ones (TRL's batch layout).
fn pair_sequences(examples: &[(usize, &TrainExample)], max_length: usize) -> Vec<Sequence> {
    let (chosen, rejected): (Vec<&PromptCompletion>, Vec<&PromptCompletion>) = examples
        .iter()
        .filter_map(|(_, e)| match e {
            TrainExample::Pair { chosen, rejected } => Some((chosen, rejected)),
            _ => None,
        })
        .unzip();
    let mut seqs = sequences(&chosen, max_length);
    seqs.extend(sequences(&rejected, max_length));
    seqs
}

fn dpo(ctx: &StepContext, examples: &[(usize, &TrainExample)], scale: f64) -> Result<MicroOutput> {
    let cfg = ctx.cfg;
    let p = examples.len();
    let seqs = pair_sequences(examples, cfg.max_length);
    let b = batch(ctx, &seqs, &[])?;
    // The reference first: its forward's transient buffers are freed before the policy's
    // forward starts holding activations for backward, so they do not add to the peak.
    let (ref_c, ref_r) = reference_logps(ctx, examples, &b, None)?;
    let scored = score_with_stats(ctx.policy, &b)?;
    let lp_c = scored.seq_logps.narrow(0, 0, p)?;
    let lp_r = scored.seq_logps.narrow(0, p, p)?;
    let counts: Vec<f32> = scored.seq_tokens.iter().map(|&n| n as f32).collect();
    let n_c = Tensor::new(&counts[..p], ctx.device)?;
    let n_r = Tensor::new(&counts[p..], ctx.device)?;
    let out = dpo_loss(
        &PairLogps {
            chosen: &lp_c,
            rejected: &lp_r,
            ref_chosen: &ref_c,
            ref_rejected: &ref_r,
            chosen_tokens: &n_c,
            rejected_tokens: &n_r,
        },
        &DpoOptions {
            beta: cfg.beta,
            loss_type: LossType::dpo(cfg.loss_type)?,
            label_smoothing: cfg.label_smoothing,
        },
    )?;
    let chosen_tokens: f64 = counts[..p].iter().map(|&c| c as f64).sum();
    let mut loss = out.loss;
    let mut metrics: Metrics = Vec::new();
    if cfg.rpo_alpha > 0.0 {
        // RPO: token-mean NLL over all chosen completion tokens of the batch.
        let nll = (lp_c.sum_all()?.neg()? / chosen_tokens.max(1.0))?;
        metrics.push(("nll_loss", nll.to_scalar::<f32>()? as f64));
        loss = (loss + (nll * cfg.rpo_alpha)?)?;
    }
    let (rc, rr) = (vec1(&out.chosen_rewards)?, vec1(&out.rejected_rewards)?);
    let (lc, lr) = (vec1(&lp_c)?, vec1(&lp_r)?);
    let stats = &scored.stats;
    let all = token_sums(stats, &b, |_| true);
    let cs = token_sums(stats, &b, |s| s < p);
    let rs = token_sums(stats, &b, |s| s >= p);
    let per_token = |v: &[f32], n: &[f32]| {
        mean(
            &v.iter()
                .zip(n)
                .map(|(a, b)| a / b.max(1.0))
                .collect::<Vec<_>>(),
        )
    };
    metrics.extend([
        ("rewards/chosen", mean(&rc)),
        ("rewards/rejected", mean(&rr)),
        (
            "rewards/accuracies",
            rc.iter().zip(&rr).filter(|(a, b)| a > b).count() as f64 / p as f64,
        ),
        ("rewards/margins", mean(&rc) - mean(&rr)),
        ("logps/chosen", mean(&lc)),
        ("logps/rejected", mean(&lr)),
        ("logps/chosen_per_token", per_token(&lc, &counts[..p])),
        ("logps/rejected_per_token", per_token(&lr, &counts[p..])),
        ("logits/chosen", cs.logit / cs.count.max(1.0)),
        ("logits/rejected", rs.logit / rs.count.max(1.0)),
        ("entropy", all.entropy / all.count.max(1.0)),
        ("mean_token_accuracy", cs.hits / cs.count.max(1.0)),
    ]);
    Ok(MicroOutput {
        loss: (loss * scale)?,
        metrics,
        tokens: b.n_tokens,
    })
}

fn kto(ctx: &StepContext, examples: &[(usize, &TrainExample)], scale: f64) -> Result<MicroOutput> {
    let cfg = ctx.cfg;
    let mut main = Vec::new();
    let mut kl = Vec::new();
    let mut desirable = Vec::new();
    for (_, e) in examples {
        if let TrainExample::Unpaired {
            seq,
            kl: k,
            desirable: d,
        } = e
        {
            main.push(seq);
            kl.push(k);
            desirable.push(*d);
        }
    }
    let b = batch(ctx, &sequences(&main, cfg.max_length), &[])?;
    let kb = batch(ctx, &sequences(&kl, cfg.max_length), &[])?;
    // Untracked forwards first (see `dpo`).
    let (ref_main, ref_kl) = reference_logps(ctx, examples, &b, Some(&kb))?;
    let kl_logps = score(ctx.policy_frozen, &kb)?.seq_logps;
    let scored = score_with_stats(ctx.policy, &b)?;
    let out = kto_loss(
        &scored.seq_logps,
        &ref_main,
        &kl_logps,
        &ref_kl,
        &desirable,
        &KtoOptions {
            beta: cfg.beta,
            desirable_weight: cfg.desirable_weight,
            undesirable_weight: cfg.undesirable_weight,
        },
    )?;
    let rewards = vec1(&out.rewards)?;
    let logps = vec1(&scored.seq_logps)?;
    let pick = |v: &[f32], want: bool| -> Vec<f32> {
        v.iter()
            .zip(&desirable)
            .filter(|(_, &d)| d == want)
            .map(|(&x, _)| x)
            .collect()
    };
    let mut metrics: Metrics = vec![("kl", out.kl as f64)];
    let stats = &scored.stats;
    let all = token_sums(stats, &b, |_| true);
    metrics.push(("entropy", all.entropy / all.count.max(1.0)));
    for (want, names) in [
        (true, ["rewards/chosen", "logps/chosen", "logits/chosen"]),
        (
            false,
            ["rewards/rejected", "logps/rejected", "logits/rejected"],
        ),
    ] {
        let r = pick(&rewards, want);
        if r.is_empty() {
            continue;
        }
        let s = token_sums(stats, &b, |i| desirable[i] == want);
        metrics.push((names[0], mean(&r)));
        metrics.push((names[1], mean(&pick(&logps, want))));
        metrics.push((names[2], s.logit / s.count.max(1.0)));
    }
    let (rc, rr) = (pick(&rewards, true), pick(&rewards, false));
    if !rc.is_empty() && !rr.is_empty() {
        metrics.push(("rewards/margins", mean(&rc) - mean(&rr)));
    }
    Ok(MicroOutput {
        loss: (out.loss * scale)?,
        metrics,
        tokens: b.n_tokens,
    })
}

fn orpo(ctx: &StepContext, examples: &[(usize, &TrainExample)], scale: f64) -> Result<MicroOutput> {
    let cfg = ctx.cfg;
    let p = examples.len();
    let seqs = pair_sequences(examples, cfg.max_length);
    let score_prompt: Vec<bool> = (0..2 * p).map(|i| i < p).collect();
    let b = batch(ctx, &seqs, &score_prompt)?;
    let scored = score(ctx.policy, &b)?;
    let counts: Vec<f32> = scored.seq_tokens.iter().map(|&n| n.max(1) as f32).collect();
    let mean_logps = scored
        .seq_logps
        .div(&Tensor::new(counts.as_slice(), ctx.device)?)?; // (2p,)
    let (mc, mr) = (mean_logps.narrow(0, 0, p)?, mean_logps.narrow(0, p, p)?);
    // NLL: token mean over every scored token of the chosen rows (prompt included).
    let in_chosen: Vec<f32> = b
        .seq_of
        .iter()
        .map(|&s| ((s as usize) < p) as u8 as f32)
        .collect();
    let n_chosen: f32 = in_chosen.iter().sum();
    let nll = (segment_sum(
        &scored.token_logps,
        &vec![0; b.seq_of.len()],
        Some(&in_chosen),
        1,
    )?
    .squeeze(0)?
    .neg()?
        / n_chosen.max(1.0) as f64)?;
    let out = orpo_loss(&mc, &mr, &nll, cfg.beta)?;
    let (lc, lr) = (vec1(&mc)?, vec1(&mr)?);
    let rc: Vec<f32> = lc.iter().map(|x| x * cfg.beta as f32).collect();
    let rr: Vec<f32> = lr.iter().map(|x| x * cfg.beta as f32).collect();
    let (logits_c, logits_r) = orpo_logit_means(ctx.policy, &scored.hidden, p)?;
    let metrics: Metrics = vec![
        ("rewards/chosen", mean(&rc)),
        ("rewards/rejected", mean(&rr)),
        (
            "rewards/accuracies",
            rc.iter().zip(&rr).filter(|(a, b)| a > b).count() as f64 / p as f64,
        ),
        ("rewards/margins", mean(&rc) - mean(&rr)),
        ("logps/chosen", mean(&lc)),
        ("logps/rejected", mean(&lr)),
        ("logits/chosen", logits_c),
        ("logits/rejected", logits_r),
        ("nll_loss", nll.to_scalar::<f32>()? as f64),
        ("log_odds_ratio", out.log_odds_ratio as f64),
        ("log_odds_chosen", out.log_odds_chosen as f64),
    ];
    Ok(MicroOutput {
        loss: (out.loss * scale)?,
        metrics,
        tokens: b.n_tokens,
    })
}

/// TRL's ORPO `logits/chosen`: the mean logit over every position but the last of the chosen
/// rows — padding included — and the whole vocabulary. mean_v(h·W_v) = h·mean_v(W_v), so this
/// needs one (c,) vector, not the logits.
fn orpo_logit_means(policy: &Decoder, hidden: &Tensor, p: usize) -> Result<(f64, f64)> {
    let (_, t, _) = hidden.dims3()?;
    let w_mean = upcast(&policy.lm_head().detach())?.mean(0)?; // (c,), f32 even for a bf16 base
    let h = hidden.detach().narrow(1, 0, t.saturating_sub(1).max(1))?; // (2p, t-1, c)
    let per_pos = h.broadcast_mul(&w_mean)?.sum(D::Minus1)?; // (2p, t-1)
    let c = per_pos.narrow(0, 0, p)?.mean_all()?.to_scalar::<f32>()? as f64;
    let r = per_pos.narrow(0, p, p)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok((c, r))
}
