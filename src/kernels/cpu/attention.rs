//! Scaled dot-product attention as one graph node with its own backward, on the CPU in f32.
//!
//! Why: composed from candle ops, attention is five nodes per layer (q·kᵀ, scale, mask,
//! softmax, p·v) plus layout copies, each a full pass over the (b·h·t·s) scores with an
//! allocation, and candle's backward zero-fills a gradient buffer for every edge before
//! adding into it. Here each (batch, query head) block runs its two products through `gemm`
//! on slices, the softmax in place, and keeps the probabilities for the backward; the graph
//! sees one node with three input gradients.
//!
//! Per block, with S = scale·Q·Kᵀ + M, P = softmax(S), O = P·V and upstream dO:
//! dV = Σ_heads Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = scale·dS·K,
//! dK = Σ_heads scale·dSᵀ·Q — the sums run over the query heads sharing a key/value head
//! (grouped-query attention). Reference: the composed path (`kernels::composed::attention`,
//! transformers' `eager_attention_forward`); tests/kernels/ checks output and gradients
//! against it with grouped-query heads, padding masks and strided inputs.
//!
//! Masked blocks are skipped: the score matrix is cut into tiles of [`TILE`] queries × [`TILE`]
//! keys, and a tile where the mask hides every key from every query (the future of a causal
//! row; a packed row's other sequences; a sliding window's far past) is neither multiplied nor
//! exponentiated: its probabilities are exactly 0 either way (e^(−10³⁰ − max) underflows), so
//! the result differs from the dense one only in the order of the products' sums. On the
//! SmolLM-135M DPO workload (packed prompt + chosen + rejected rows) 61 % of the scores are
//! masked. A query with every key masked (padding) keeps the dense row (a uniform softmax, as
//! the composed path gives it). The probabilities kept for backward are stored packed, each
//! query tile's rows holding only its spans' columns side by side ([`Packed`]), so the skipped
//! tiles cost no memory either (the SmolLM-135M DPO step keeps 17 of each row's 36 tiles;
//! its peak RSS went 1,912 → 1,752 MiB).
//!
//! Legend: b batch, hq query heads, hkv key/value heads, t queries, s keys, d head dim.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, TensorId};
use multiversion::multiversion;
use rayon::prelude::*;

use super::fast_exp::{divide_in_place, exp_shifted_in_place};
use super::gemm::{gemm_into_serial, gemm_into_tile, gemm_write_tile, Mat};
use super::{assume_written, data, dot, is_f32, max, par_zeros, uninit, written_mut};
use crate::model::ops::MASKED;

/// Queries and keys per tile of the score matrix (see the module comment).
const TILE: usize = 64;

/// Mask values at or below this hide the key (`MASKED` itself, −∞ too): e^(score + mask − max)
/// is then exactly 0 for any finite score.
const HIDDEN_AT: f32 = MASKED / 10.0;

/// Per batch row, per tile of [`TILE`] queries: the runs of keys [k0, k1) to compute, made of
/// whole key tiles in which some query of the tile sees some key. A tile holding a query that
/// sees no key at all gets the whole row. `mask` is (b, 1, t, s).
fn key_spans(mask: &[f32], b: usize, t: usize, s: usize) -> Vec<Vec<Vec<(usize, usize)>>> {
    let key_tiles = s.div_ceil(TILE);
    // On the pool: a serial scan of the (b, t, s) mask per layer was ~1 % of a DPO step.
    (0..b)
        .into_par_iter()
        .map(|batch| {
            (0..t.div_ceil(TILE))
                .into_par_iter()
                .map(|qt| {
                    let mut seen = vec![false; key_tiles];
                    let mut blind_query = false;
                    for i in qt * TILE..((qt + 1) * TILE).min(t) {
                        let row = &mask[(batch * t + i) * s..(batch * t + i + 1) * s];
                        let mut any = false;
                        for (kt, keys) in row.chunks(TILE).enumerate() {
                            if keys.iter().any(|&m| m > HIDDEN_AT) {
                                seen[kt] = true;
                                any = true;
                            }
                        }
                        blind_query |= !any;
                    }
                    if blind_query {
                        return vec![(0, s)];
                    }
                    let mut spans: Vec<(usize, usize)> = Vec::new();
                    for kt in (0..key_tiles).filter(|&kt| seen[kt]) {
                        let (k0, k1) = (kt * TILE, ((kt + 1) * TILE).min(s));
                        match spans.last_mut() {
                            Some(last) if last.1 == k0 => last.1 = k1,
                            _ => spans.push((k0, k1)),
                        }
                    }
                    spans
                })
                .collect()
        })
        .collect()
}

/// Where a query tile's probabilities sit in its head's packed block: `rows × width` values
/// from `start`, `width` being the total length of the tile's key spans.
#[derive(Clone, Copy)]
struct TileAt {
    start: usize,
    width: usize,
}

/// The packed layout of the kept probabilities: per batch row, one block per query head of
/// `per_head[batch]` values, the query tiles one after another (see the module comment).
struct Packed {
    tiles: Vec<Vec<TileAt>>,
    per_head: Vec<usize>,
}

impl Packed {
    fn new(spans: &[Vec<Vec<(usize, usize)>>], t: usize) -> Self {
        let mut tiles = Vec::with_capacity(spans.len());
        let mut per_head = Vec::with_capacity(spans.len());
        for row in spans {
            let mut start = 0;
            let at: Vec<TileAt> = row
                .iter()
                .enumerate()
                .map(|(qt, tile_spans)| {
                    let rows = ((qt + 1) * TILE).min(t) - qt * TILE;
                    let width = tile_spans.iter().map(|&(k0, k1)| k1 - k0).sum();
                    let here = TileAt { start, width };
                    start += rows * width;
                    here
                })
                .collect();
            tiles.push(at);
            per_head.push(start);
        }
        Packed { tiles, per_head }
    }

    /// The block of every (batch, head), in order, as disjoint mutable slices of `buf`.
    fn blocks<'a, T>(&self, buf: &'a mut [T], heads: usize) -> Vec<&'a mut [T]> {
        let mut rest = buf;
        self.block_ranges(heads)
            .into_iter()
            .map(|range| {
                let (block, tail) = std::mem::take(&mut rest).split_at_mut(range.len());
                rest = tail;
                block
            })
            .collect()
    }

    fn len(&self, heads: usize) -> usize {
        self.per_head.iter().sum::<usize>() * heads
    }

    /// The range of every (batch, head) block in the packed buffer, in order.
    fn block_ranges(&self, heads: usize) -> Vec<std::ops::Range<usize>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.per_head.len() * heads);
        for &len in &self.per_head {
            for _ in 0..heads {
                out.push(start..start + len);
                start += len;
            }
        }
        out
    }
}

/// A tile's spans with the packed column where each begins: (column, k0, k1).
fn packed_spans(spans: &[(usize, usize)]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    spans.iter().scan(0, |col, &(k0, k1)| {
        let here = *col;
        *col += k1 - k0;
        Some((here, k0, k1))
    })
}

/// Columns [col, col + cols) of a packed tile of `width` columns, as a view.
fn packed_view(tile: &[f32], rows: usize, width: usize, col: usize, cols: usize) -> Mat<'_, f32> {
    Mat {
        data: &tile[col..],
        rows,
        cols,
        rs: width,
        cs: 1,
    }
}

// The element loops of the forward and backward, as functions of their own so they are
// compiled for AVX-512 and AVX2 (inside the rayon closures they were compiled for the baseline
// x86-64 only).

/// x ← scale·x + m, element by element.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn scale_add(xs: &mut [f32], scale: f32, mask: &[f32]) {
    for (x, &m) in xs.iter_mut().zip(mask) {
        *x = scale * *x + m;
    }
}

/// One row of dS = P ⊙ (dP − c), with c = rowsum(dP ⊙ P): `ds` holds dP on entry.
#[multiversion(targets("x86_64+avx512f", "x86_64+avx2+fma"))]
fn softmax_grad_row(ds: &mut [f32], p: &[f32], c: f32) {
    for (x, &p) in ds.iter_mut().zip(p) {
        *x = p * (*x - c);
    }
}

/// Whether the kernel takes these operands: all f32 (shapes are checked by [`attention`]).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    [q, k, v, mask].iter().all(|t| is_f32(t))
}

/// softmax(scale·q·kᵀ + mask)·v for q (b, hq, t, d), k and v (b, hkv, s, d), mask (b, 1, t, s).
/// Returns (b, hq, t, d). All f32 on the CPU.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, hq, t, d) = q.dims4()?;
    let (kb, hkv, s, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 {
        candle_core::bail!(
            "fused attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if mask.dims() != [b, 1, t, s] {
        candle_core::bail!(
            "fused attention: mask {:?} is not (b, 1, t, s)",
            mask.dims()
        )
    }
    let dims = Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
    };
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            mask: mask.contiguous()?,
            scale: scale as f32,
            dims,
            saved: Mutex::new(None),
        },
    )
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    s: usize,
    d: usize,
}

struct Attention {
    mask: Tensor,
    scale: f32,
    dims: Dims,
    /// What the last forward keeps for the backward.
    saved: Mutex<Option<Saved>>,
}

/// The forward's probabilities, packed, with the key spans and layout they were packed by
/// (so the backward reads neither the mask nor computes them again).
struct Saved {
    probs: Vec<f32>,
    tiles: Arc<MaskTiles>,
}

/// A mask's key spans ([`key_spans`]) and the packed layout they give ([`Packed`]).
struct MaskTiles {
    spans: Vec<Vec<Vec<(usize, usize)>>>,
    packed: Packed,
}

thread_local! {
    /// The last mask's tiles on this thread: every layer of a forward attends over the same
    /// mask tensor, so its (b, t, s) values are scanned once per forward, not once per layer.
    static LAST_MASK: RefCell<Option<(TensorId, Arc<MaskTiles>)>> = const { RefCell::new(None) };
}

/// The tiles of `mask` (b, 1, t, s), whose values are `values`: the last ones computed on this
/// thread when `mask` is the same tensor (candle tensors do not change once made), else
/// computed now.
fn mask_tiles(mask: &Tensor, values: &[f32], b: usize, t: usize, s: usize) -> Arc<MaskTiles> {
    let id = mask.id();
    if let Some(tiles) = LAST_MASK.with(|last| match &*last.borrow() {
        Some((last_id, tiles)) if *last_id == id => Some(tiles.clone()),
        _ => None,
    }) {
        return tiles;
    }
    let spans = key_spans(values, b, t, s);
    let packed = Packed::new(&spans, t);
    let tiles = Arc::new(MaskTiles { spans, packed });
    LAST_MASK.with(|last| *last.borrow_mut() = Some((id, tiles.clone())));
    tiles
}

fn f32_slice<'a>(storage: &'a Storage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => data(s, l, what),
        _ => candle_core::bail!("fused attention: {what} must be on the CPU"),
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            data(qs, ql, "attention q")?,
            data(ks, kl, "attention k")?,
            data(vs, vl, "attention v")?,
        );
        let mask_guard = self.mask.storage_and_layout();
        let mask = f32_slice(&mask_guard.0, mask_guard.1, "mask")?;
        let Dims {
            b,
            hq,
            hkv,
            t,
            s,
            d,
        } = self.dims;
        let rep = hq / hkv;
        let tiles = mask_tiles(&self.mask, mask, b, t, s);
        let (spans, packed) = (&tiles.spans, &tiles.packed);
        // Neither buffer is zero-filled: every tile of scores and every row of the output is
        // written by its first product below.
        let mut probs = uninit(packed.len(hq));
        let mut out = uninit(b * hq * t * d);
        packed
            .blocks(&mut probs, hq)
            .into_par_iter()
            .zip(out.par_chunks_mut(t * d))
            .enumerate()
            .try_for_each(|(block, (p, o))| -> candle_core::Result<()> {
                let (batch, head) = (block / hq, block % hq);
                let kv = (batch * hkv + head / rep) * s * d;
                let qb = &q[block * t * d..(block + 1) * t * d];
                let (kb, vb) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
                for (qt, spans) in spans[batch].iter().enumerate() {
                    let rows = (qt * TILE, ((qt + 1) * TILE).min(t));
                    let n_rows = rows.1 - rows.0;
                    let TileAt { start, width } = packed.tiles[batch][qt];
                    let tile = &mut p[start..start + n_rows * width];
                    let q_tile = Mat::dense(&qb[rows.0 * d..rows.1 * d], n_rows, d);
                    // S = Q·Kᵀ on the spans, side by side in the packed tile.
                    for (col, k0, k1) in packed_spans(spans) {
                        let k_span = Mat::dense(&kb[k0 * d..k1 * d], k1 - k0, d).t();
                        gemm_write_tile(&mut tile[col..], width, 1.0, q_tile, k_span)?;
                    }
                    // SAFETY: the spans' columns lie side by side and add up to `width`, so the
                    // products above wrote every element of the tile's rows.
                    let tile = unsafe { written_mut(tile) };
                    // P = softmax(scale·S + M), row by row.
                    for (row, i) in tile.chunks_mut(width.max(1)).zip(rows.0..rows.1) {
                        let m = &mask[(batch * t + i) * s..(batch * t + i + 1) * s];
                        for (col, k0, k1) in packed_spans(spans) {
                            scale_add(&mut row[col..col + k1 - k0], self.scale, &m[k0..k1]);
                        }
                        let total = exp_shifted_in_place(row, max(row));
                        divide_in_place(row, total);
                    }
                    // O = P·V on the spans: the first product writes the rows, the others add.
                    let o_tile = &mut o[rows.0 * d..rows.1 * d];
                    let mut products = packed_spans(spans).map(|(col, k0, k1)| {
                        let p_span = packed_view(tile, n_rows, width, col, k1 - k0);
                        (p_span, Mat::dense(&vb[k0 * d..k1 * d], k1 - k0, d))
                    });
                    match products.next() {
                        Some((p_span, v_span)) => gemm_write_tile(o_tile, d, 1.0, p_span, v_span)?,
                        None => o_tile.iter_mut().for_each(|x| {
                            x.write(0.0);
                        }),
                    }
                    // SAFETY: every element of the tile was written just above.
                    let o_tile = unsafe { written_mut(o_tile) };
                    for (p_span, v_span) in products {
                        gemm_into_serial(o_tile, true, 1.0, p_span, v_span)?;
                    }
                }
                Ok(())
            })?;
        // SAFETY: the blocks cover `probs` and each block's tiles cover it (`Packed`), the
        // (batch, head) chunks cover `out` and each one's query tiles cover its t rows; every
        // tile was written above.
        let (probs, out) = unsafe { (assume_written(probs), assume_written(out)) };
        if let Ok(mut saved) = self.saved.lock() {
            *saved = Some(Saved {
                probs,
                tiles: tiles.clone(),
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, hq, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = match self.saved.lock() {
            Ok(mut saved) => saved.take(),
            Err(_) => None,
        };
        let Some(Saved { probs, tiles }) = saved else {
            candle_core::bail!("fused attention: backward without a saved forward")
        };
        let (spans, packed) = (&tiles.spans, &tiles.packed);
        let grad = grad.contiguous()?;
        let (qg, kg, vg, gg) = (
            q.storage_and_layout(),
            k.storage_and_layout(),
            v.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let q_ = f32_slice(&qg.0, qg.1, "q")?;
        let k_ = f32_slice(&kg.0, kg.1, "k")?;
        let v_ = f32_slice(&vg.0, vg.1, "v")?;
        let g_ = f32_slice(&gg.0, gg.1, "grad")?;
        let Dims {
            b,
            hq,
            hkv,
            t,
            s,
            d,
        } = self.dims;
        let rep = hq / hkv;
        let blocks = packed.block_ranges(hq);
        let mut dq = par_zeros(b * hq * t * d);
        let mut dk = par_zeros(b * hkv * s * d);
        let mut dv = par_zeros(b * hkv * s * d);
        // One task per (batch, kv head): it owns dK, dV of that head and dQ of its query heads.
        // Every product runs on the forward's spans only (P is 0 outside them); dP and dS
        // are packed like P.
        dk.par_chunks_mut(s * d)
            .zip(dv.par_chunks_mut(s * d))
            .zip(dq.par_chunks_mut(rep * t * d))
            .enumerate()
            .try_for_each(|(group, ((dk, dv), dq))| -> candle_core::Result<()> {
                let batch = group / hkv;
                let kv = group * s * d;
                let (kb, vb) = (&k_[kv..kv + s * d], &v_[kv..kv + s * d]);
                let mut ds = Vec::new();
                for r in 0..rep {
                    let block = group * rep + r;
                    let p = &probs[blocks[block].clone()];
                    let go = &g_[block * t * d..(block + 1) * t * d];
                    let qb = &q_[block * t * d..(block + 1) * t * d];
                    let dqb = &mut dq[r * t * d..(r + 1) * t * d];
                    for (qt, spans) in spans[batch].iter().enumerate() {
                        let rows = (qt * TILE, ((qt + 1) * TILE).min(t));
                        let n_rows = rows.1 - rows.0;
                        let TileAt { start, width } = packed.tiles[batch][qt];
                        let p_tile = &p[start..start + n_rows * width];
                        ds.resize(n_rows * width, 0.0);
                        let go_tile = Mat::dense(&go[rows.0 * d..rows.1 * d], n_rows, d);
                        let q_tile = Mat::dense(&qb[rows.0 * d..rows.1 * d], n_rows, d);
                        for (col, k0, k1) in packed_spans(spans) {
                            // dV += Pᵀ·dO, and dP = dO·Vᵀ
                            let p_span = packed_view(p_tile, n_rows, width, col, k1 - k0);
                            gemm_into_serial(
                                &mut dv[k0 * d..k1 * d],
                                true,
                                1.0,
                                p_span.t(),
                                go_tile,
                            )?;
                            let v_span = Mat::dense(&vb[k0 * d..k1 * d], k1 - k0, d).t();
                            gemm_into_tile(&mut ds[col..], width, false, 1.0, go_tile, v_span, 1)?;
                        }
                        // dS = P ⊙ (dP − rowsum(dP ⊙ P))
                        let w = width.max(1);
                        for (dsr, pr) in ds.chunks_mut(w).zip(p_tile.chunks(w)) {
                            let c = dot(dsr, pr);
                            softmax_grad_row(dsr, pr, c);
                        }
                        // dQ = scale·dS·K; dK += scale·dSᵀ·Q
                        let dq_tile = &mut dqb[rows.0 * d..rows.1 * d];
                        for (n, (col, k0, k1)) in packed_spans(spans).enumerate() {
                            let ds_span = packed_view(&ds, n_rows, width, col, k1 - k0);
                            let k_span = Mat::dense(&kb[k0 * d..k1 * d], k1 - k0, d);
                            let scale = self.scale as f64;
                            gemm_into_serial(dq_tile, n > 0, scale, ds_span, k_span)?;
                            gemm_into_serial(
                                &mut dk[k0 * d..k1 * d],
                                true,
                                scale,
                                ds_span.t(),
                                q_tile,
                            )?;
                        }
                    }
                }
                Ok(())
            })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, hq, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, hkv, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, hkv, s, d), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (t, t) mask from "row i sees key j".
    fn mask_of(t: usize, sees: impl Fn(usize, usize) -> bool) -> Vec<f32> {
        (0..t * t)
            .map(|x| if sees(x / t, x % t) { 0.0 } else { -1e30 })
            .collect()
    }

    #[test]
    fn key_spans_keep_exactly_the_tiles_some_query_sees() {
        // Causal over 150: query tile n sees key tiles 0..=n.
        let causal = key_spans(&mask_of(150, |i, j| j <= i), 1, 150, 150);
        assert_eq!(
            causal[0],
            vec![vec![(0, 64)], vec![(0, 128)], vec![(0, 150)]]
        );
        // Packed prompt | chosen | rejected of 64 each: the rejected skips the chosen.
        let packed = key_spans(
            &mask_of(192, |i, j| j <= i && (j < 64 || i / 64 == j / 64)),
            1,
            192,
            192,
        );
        assert_eq!(packed[0][2], vec![(0, 64), (128, 192)]);
        // A query that sees nothing (padding) makes its tile dense.
        let blind = key_spans(&mask_of(100, |i, j| i < 90 && j <= i), 1, 100, 100);
        assert_eq!(blind[0], vec![vec![(0, 64)], vec![(0, 100)]]);
    }
}
