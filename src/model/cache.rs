//! Key/value cache for incremental decoding: each layer keeps the keys and values of every
//! position seen so far, so a new token costs one position's work instead of the whole prefix.

use candle_core::Tensor;

/// Per-layer (k, v), each (b, h_kv, s, d).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's k, v for `layer` and returns the full (cached + new) k, v.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let (k_all, v_all) = match &self.layers[layer] {
            Some((ck, cv)) => (Tensor::cat(&[ck, k], 2)?, Tensor::cat(&[cv, v], 2)?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        self.layers[layer] = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }
}
