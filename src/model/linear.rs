//! A dense layer `y = x Wᵀ + b` as stored in Hugging Face checkpoints, optionally with a LoRA
//! adapter. GPT-2's `Conv1D` stores W transposed, (in, out); `transposed` marks that layout
//! so the weights stay byte-identical to the checkpoint and save back under the same name.
//!
//! The products themselves are [`crate::kernels`] ops: [`kernels::lora_linear`] for a layer
//! with an adapter (a fused CPU op, or the composed path on other devices) and
//! [`kernels::frozen_matmul`] otherwise; either way a frozen W gets no gradient (a LoRA base
//! would otherwise cost a weight-sized gradient per layer per step for nothing). This file
//! draws LoRA's training dropout masks, so both paths see the same ones.
//!
//! A frozen W may be held in bf16/f16 ([`super::frozen_dtype`]); both paths upcast it to f32
//! right before each product (forward and the input gradient), so no f32 copy outlives it.

use candle_core::{Module, Tensor};

use super::lora::Adapter;
use crate::kernels;

#[derive(Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Weight stored as (in, out) (GPT-2 Conv1D) instead of (out, in).
    pub transposed: bool,
    pub lora: Option<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: false,
            lora: None,
        }
    }

    pub fn conv1d(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            transposed: true,
            lora: None,
        }
    }

    /// Every tensor of the layer (weight, bias, adapter factors), for gradient checkpointing.
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.weight.clone()];
        out.extend(self.bias.clone());
        if let Some(ad) = &self.lora {
            out.extend([ad.a.clone(), ad.b.clone()]);
        }
        out
    }

    /// W as (in, out), ready to right-multiply rows.
    fn weight_in_out(&self) -> candle_core::Result<Tensor> {
        if self.transposed {
            Ok(self.weight.clone())
        } else {
            self.weight.t()
        }
    }
}

impl Module for Linear {
    /// x: (..., in) → (..., out)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / inp, inp))?; // (rows, in)
        let w = self.weight_in_out()?; // (in, out)
        let bias = self.bias.as_ref();
        let y = match &self.lora {
            Some(ad) => {
                // Training: the adapter sees a freshly dropped-out copy of its input (the
                // same seeded, checkpoint-replayed masks on both kernel paths).
                let dropout = if ad.dropout > 0.0 && ad.a.is_variable() {
                    Some((dropout_tape::mask(x2.elem_count(), ad.dropout)?, ad.dropout))
                } else {
                    None
                };
                kernels::lora_linear(&x2, &w, bias, (&ad.a, &ad.b), ad.scale, dropout)?
            }
            None => {
                let y = kernels::frozen_matmul(&x2, &w)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
}

thread_local! {
    /// This thread's dropout generator once a trainer seeded it ([`seed_dropout`]).
    static DROPOUT_RNG: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Seeds this thread's LoRA dropout masks. The trainers call it at every optimizer step with
/// the run's seed and the step, so two runs with one seed (and a resumed run) draw the same
/// masks, as TRL's seeded torch generator does (the masks themselves differ from torch's).
pub fn seed_dropout(seed: u64, step: usize) {
    use rand::SeedableRng;
    let mixed = seed
        ^ (step as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    DROPOUT_RNG.with(|r| *r.borrow_mut() = Some(rand::rngs::StdRng::seed_from_u64(mixed)));
}

/// One 0/1 byte per element: kept with probability 1 − p (independent draws from the seeded
/// generator, or an unseeded one outside a trainer).
fn dropout_keep_mask(n: usize, p: f64) -> Vec<u8> {
    use rand::Rng;
    let threshold = (p * u32::MAX as f64) as u32;
    let draw = |rng: &mut dyn rand::RngCore| -> Vec<u8> {
        (0..n)
            .map(|_| (rng.gen::<u32>() > threshold) as u8)
            .collect()
    };
    DROPOUT_RNG.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => draw(rng),
        None => draw(&mut rand::thread_rng()),
    })
}

/// LoRA dropout masks of a checkpointed layer ([`super::checkpoint`]): recorded in its first
/// run and handed out again, in the same order, in its rerun during backward, so the rerun
/// computes exactly what the first run did. Per thread; outside both, masks are just drawn.
pub mod dropout_tape {
    use std::cell::RefCell;

    enum Mode {
        Off,
        /// Masks drawn so far; `source` (reversed) supplies them instead of drawing when this
        /// record runs inside a replay.
        Record {
            drawn: Vec<Vec<u8>>,
            source: Option<Vec<Vec<u8>>>,
        },
        /// Recorded masks still to hand out, reversed.
        Replay(Vec<Vec<u8>>),
    }

    thread_local! {
        static TAPE: RefCell<Mode> = const { RefCell::new(Mode::Off) };
    }

    fn mismatch() -> candle_core::Error {
        candle_core::Error::Msg(
            "gradient checkpointing: the rerun drew a dropout mask the first run did not".into(),
        )
    }

    /// A keep mask of `n` bytes for dropout probability `p`.
    pub(super) fn mask(n: usize, p: f64) -> candle_core::Result<Vec<u8>> {
        TAPE.with(|t| match &mut *t.borrow_mut() {
            Mode::Off => Ok(super::dropout_keep_mask(n, p)),
            Mode::Record { drawn, source } => {
                let m = match source {
                    Some(q) => q.pop().filter(|m| m.len() == n).ok_or_else(mismatch)?,
                    None => super::dropout_keep_mask(n, p),
                };
                drawn.push(m.clone());
                Ok(m)
            }
            Mode::Replay(q) => q.pop().filter(|m| m.len() == n).ok_or_else(mismatch),
        })
    }

    /// Runs `f`, returning the masks it drew (inside a replay: took). Nested records also
    /// count towards the enclosing one.
    pub fn record<T>(
        f: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<(T, Vec<Vec<u8>>)> {
        let mut prev = TAPE.with(|t| t.replace(Mode::Off));
        let source = match &mut prev {
            Mode::Replay(q) => Some(std::mem::take(q)),
            Mode::Record { source, .. } => source.take(),
            Mode::Off => None,
        };
        TAPE.with(|t| {
            t.replace(Mode::Record {
                drawn: Vec::new(),
                source,
            })
        });
        let out = f();
        let (drawn, source) = match TAPE.with(|t| t.replace(Mode::Off)) {
            Mode::Record { drawn, source } => (drawn, source),
            _ => (Vec::new(), None),
        };
        match &mut prev {
            Mode::Replay(q) => *q = source.unwrap_or_default(),
            Mode::Record {
                drawn: outer,
                source: s,
            } => {
                outer.extend(drawn.iter().cloned());
                *s = source;
            }
            Mode::Off => {}
        }
        TAPE.with(|t| t.replace(prev));
        Ok((out?, drawn))
    }

    /// Runs `f`, handing it `masks` in the order they were recorded.
    pub fn replay<T>(
        masks: &[Vec<u8>],
        f: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<T> {
        let reversed = masks.iter().rev().cloned().collect();
        let prev = TAPE.with(|t| t.replace(Mode::Replay(reversed)));
        let out = f();
        TAPE.with(|t| t.replace(prev));
        out
    }
}
