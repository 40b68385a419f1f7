//! `leash lab logps`: A sequence log-prob from leash's scorer vs a hand computation in f64 from raw
//! logits.

use std::fmt::Write as _;

use super::{plot, Lab};
use crate::data::collate::collate;
use crate::data::encode::Sequence;
use crate::error::Result;
use crate::eval::evaluate::load_policy;
use crate::loss::logps::score;
use crate::model::frozen_dtype::upcast;
use crate::model::ForwardInput;
use crate::report::plot::Series;

impl Lab {
    pub(super) fn logps(&self) -> Result<(String, bool, String)> {
        let (model, tok) = load_policy(&self.reference, None, &self.device)?;
        let prompt = tok.encode("Q: what is 3 + 4?", true)?;
        let full = tok.encode(
            &format!("Q: what is 3 + 4? Sure! 3 + 4 = 7.{}", tok.eos_token),
            true,
        )?;
        let seq = Sequence {
            loss_start: prompt.len(),
            ids: full.clone(),
        };
        let batch = collate(&[&seq], tok.pad_id, None, &[], &self.device)?;
        let leash_lp = score(&model, &batch)?.seq_logps.to_vec1::<f32>()?[0] as f64;
        // By hand: logits at every position, log-softmax in f64, sum over completion tokens.
        let input = ForwardInput {
            ids: batch.input.ids.clone(),
            positions: (0..full.len() as u32).collect(),
            mask: batch.input.mask.clone(),
        };
        let logits = model
            .forward_hidden(&input)?
            .squeeze(0)?
            .matmul(&upcast(model.lm_head())?.t()?)?
            .to_vec2::<f32>()?;
        let mut by_hand = 0.0f64;
        let mut per_token = Vec::new();
        let mut lines = String::from("| t | token | log p |\n|---|---|---|\n");
        for t in prompt.len()..full.len() {
            let row = &logits[t - 1];
            let max = row.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let lp = row[full[t] as usize] as f64 - lse;
            by_hand += lp;
            per_token.push(((t - prompt.len() + 1) as f64, lp));
            let _ = writeln!(
                lines,
                "| {t} | {:?} | {lp:.5} |",
                tok.decode(&[full[t]], false)?
            );
        }
        let diff = (leash_lp - by_hand).abs();
        let ok = diff < 1e-4;
        let body_plot = plot(
            &self.dir.join("token_logps.png"),
            "sequence log-prob = sum of per-token log-probs",
            "completion token",
            "log p (nats)",
            &[
                Series {
                    name: "log p(token | prefix)".into(),
                    points: per_token.clone(),
                },
                Series {
                    name: "running sum".into(),
                    points: per_token
                        .iter()
                        .scan(0.0, |acc, &(t, lp)| {
                            *acc += lp;
                            Some((t, *acc))
                        })
                        .collect(),
                },
                Series {
                    name: "leash's sequence log-prob".into(),
                    points: per_token.iter().map(|&(t, _)| (t, leash_lp)).collect(),
                },
            ],
        );
        lines += &format!("\n{body_plot}");
        let verdict = format!("leash's sequence log-prob {leash_lp:.5} equals the hand computation {by_hand:.5} (|Δ| = {diff:.1e}) — {}", if ok { "reproduced" } else { "MISMATCH" });
        Ok((verdict, ok, format!("Completion \" Sure! 3 + 4 = 7.\" after \"Q: what is 3 + 4?\": the sum over completion tokens of log p(token | prefix), token t scored by the logits at t−1.\n\n{lines}")))
    }
}
