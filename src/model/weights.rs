//! Reads checkpoint tensors from `model.safetensors` or a sharded
//! `model.safetensors.index.json`, in any float dtype, converted to f32 for compute, or (for
//! frozen weights, see [`super::frozen_dtype`]) kept in bf16/f16 storage.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::frozen_dtype::FrozenDtype;
use crate::error::{read_text, LeashError, Result};

/// Named tensors of one checkpoint, all f32, with the folder they came from (for errors).
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
    /// When set, missing tensors are generated instead of reported (see [`Weights::random`]).
    random: Option<(RandomInit, Device)>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: PathBuf) -> Self {
        Weights {
            tensors,
            source,
            random: None,
        }
    }

    /// Loads every tensor of the checkpoint in `dir`, all f32.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_dir_as(dir, device, FrozenDtype::F32)
    }

    /// Loads every tensor of the checkpoint in `dir`, matrices held as `frozen` says.
    pub fn from_dir_as(dir: &Path, device: &Device, frozen: FrozenDtype) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(&index)?
        } else {
            return Err(LeashError::file(
                dir,
                "no model.safetensors or model.safetensors.index.json",
                "point --model at a Hugging Face checkpoint folder saved with safetensors \
                 (pytorch_model.bin is not supported: re-save with safe_serialization=True)",
            ));
        };
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, device).map_err(|e| {
                LeashError::file(
                    file,
                    format!("cannot read safetensors: {e}"),
                    "the file may be truncated or not a safetensors file; re-download or re-save it",
                )
            })?;
            for (name, t) in loaded {
                let t = match t.dtype() {
                    DType::F32 | DType::BF16 | DType::F16 | DType::F64 => {
                        let want = frozen.storage(t.dtype(), t.rank());
                        if t.dtype() == want {
                            t
                        } else {
                            t.to_dtype(want)?
                        }
                    }
                    other => return Err(LeashError::file(
                        file,
                        format!("tensor `{name}` has dtype {other:?}, not a float type"),
                        "quantized checkpoints are not supported; use a bf16/f16/f32 checkpoint",
                    )),
                };
                tensors.insert(name, t);
            }
        }
        Ok(Weights {
            tensors,
            source: dir.to_path_buf(),
            random: None,
        })
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some((init, device)) = &self.random {
            return Ok(random_tensor(init, name, shape, device)?);
        }
        let t = self.tensors.get(name).ok_or_else(|| {
            LeashError::file(
                &self.source,
                format!("missing tensor `{name}`"),
                "the checkpoint does not match its config.json (model_type or layer count); \
                 check both came from the same model",
            )
        })?;
        if t.dims() != shape {
            return Err(LeashError::file(
                &self.source,
                format!(
                    "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ),
                "the weights do not match config.json; check hidden_size, heads and vocab_size",
            ));
        }
        Ok(t.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.tensors.contains_key(name)
    }

    /// Names of the tensors in the checkpoint (none for random weights).
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The tensor `name` as stored, without a shape check.
    pub fn raw(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = read_text(index)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        LeashError::file(
            index,
            format!("malformed JSON: {e}"),
            "re-save the checkpoint",
        )
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            LeashError::file(
                index,
                "missing field `weight_map`",
                "a sharded checkpoint index maps tensor names to shard files under weight_map",
            )
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Seeded random initialisation for tests, benchmarks and models trained from scratch:
/// matrices ~ N(0, std²); norm weights 1 (plus `norm_jitter` noise); biases `bias_std` noise.
#[derive(Clone, Debug)]
pub struct RandomInit {
    pub seed: u64,
    pub std: f64,
    pub norm_jitter: f64,
    pub bias_std: f64,
    pub dtype: DType,
}

impl Weights {
    /// Weights that make up any requested tensor on demand, deterministically from
    /// (seed, name), so every decoder family can be built without a checkpoint.
    pub fn random(init: RandomInit, device: &Device) -> Self {
        Weights {
            tensors: HashMap::new(),
            source: PathBuf::from("<random init>"),
            random: Some((init, device.clone())),
        }
    }
}

fn random_tensor(
    init: &RandomInit,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut hash = init.seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(hash);
    let n: usize = shape.iter().product();
    let mut normal = || {
        // Box–Muller: two uniforms → one standard normal.
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let is_norm = shape.len() == 1
        && (name.contains("norm") || name.contains(".ln_") || name.starts_with("ln_"))
        && name.ends_with(".weight");
    let values: Vec<f64> = if is_norm {
        (0..n).map(|_| 1.0 + init.norm_jitter * normal()).collect()
    } else if shape.len() == 1 {
        (0..n).map(|_| init.bias_std * normal()).collect()
    } else {
        (0..n).map(|_| init.std * normal()).collect()
    };
    Tensor::from_vec(values, shape, device)?.to_dtype(init.dtype)
}
