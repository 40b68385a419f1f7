//! Gradient checkpointing (transformers' `gradient_checkpointing`, `torch.utils.checkpoint`):
//! a decoder layer run through [`checkpoint`] keeps only its input for backward; backward runs
//! the layer again from that input and differentiates the rerun. Memory for activations drops
//! from every intermediate of every layer to one input per layer plus one layer's
//! intermediates; the price is a second forward of each layer.
//!
//! candle's backward asks an op only for its inputs' gradients, but a layer's parameters are
//! variables too. So the rerun's parameter gradients are set aside (per thread: candle runs
//! backward on the calling thread) and [`backward`] adds them to the returned store. Training
//! code calls [`backward`] instead of `Tensor::backward`; on a graph without checkpointed
//! layers the two are the same.
//!
//! Exact: the rerun is the same computation on the same input, and LoRA's dropout masks are
//! recorded during the first run and replayed in the rerun ([`super::linear::dropout_tape`]).
//! Tests: tests/gradient_checkpointing.rs (every family, full and LoRA, against checkpointing
//! off).

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, Var,
};

use super::linear::dropout_tape;

/// One layer's forward, owning (cheap clones of) what it needs.
pub type LayerFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

thread_local! {
    /// Parameter gradients of reruns during the current backward on this thread.
    static PENDING: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
    /// Layers rerun by the latest [`backward`] on this thread.
    static RERUNS: Cell<usize> = const { Cell::new(0) };
}

/// How many checkpointed layers the latest [`backward`] on this thread reran: the number of
/// decoder layers with checkpointing on, 0 with it off. Lets a test tell a family that honours
/// the flag from one that silently ignores it (both give the same gradients).
pub fn last_backward_reruns() -> usize {
    RERUNS.with(Cell::get)
}

/// `loss.backward()`, plus the parameter gradients of checkpointed layers.
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    PENDING.with(|p| p.borrow_mut().clear());
    RERUNS.with(|r| r.set(0));
    let mut store = loss.backward()?;
    let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (param, grad) in pending {
        let sum = match store.get(&param) {
            Some(g) => (g + grad)?,
            None => grad,
        };
        store.insert(&param, sum);
    }
    Ok(store)
}

/// `f(x)`, keeping only `x` (and `params`, which the model holds anyway) for backward.
/// `params` are the layer's tensors; those that are variables get gradients.
pub fn checkpoint(x: &Tensor, params: Vec<Tensor>, f: LayerFn) -> candle_core::Result<Tensor> {
    let params: Vec<Tensor> = params.into_iter().filter(|p| p.is_variable()).collect();
    if !x.track_op() && params.is_empty() {
        return f(x);
    }
    let (y, masks) = dropout_tape::record(|| f(&x.detach()))?;
    let op = Checkpoint {
        output: Mutex::new(Some(y.detach())),
        masks,
        params: params.clone(),
        f,
    };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        // The input needs no gradient (a frozen embedding under LoRA), so the op hangs off a
        // trainable parameter to be part of the graph at all; that input gets no gradient.
        x.apply_op2(&params[0], op)
    }
}

struct Checkpoint {
    /// The first run's output, handed over once by `cpu_fwd`.
    output: Mutex<Option<Tensor>>,
    masks: Vec<Vec<u8>>,
    params: Vec<Tensor>,
    f: LayerFn,
}

impl Checkpoint {
    /// The first run's output; there is only one, and the op's forward runs once.
    fn take(&self) -> candle_core::Result<Tensor> {
        let y = self
            .output
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: poisoned lock".into()))?
            .take();
        match y {
            Some(y) => Ok(y),
            None => candle_core::bail!("checkpoint: forward ran twice"),
        }
    }

    fn take_output(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let flat = y.flatten_all()?;
        let storage = match y.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
            DType::F16 => CpuStorage::F16(flat.to_vec1()?),
            other => candle_core::bail!("checkpoint: unsupported dtype {other:?}"),
        };
        Ok((storage, y.shape().clone()))
    }

    /// As [`Self::take_output`] on a GPU: the output's device buffer, copied once (candle's
    /// CUDA `try_clone` copies the whole buffer, so a view is first made a fresh tensor).
    fn take_output_cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = self.take()?;
        let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
            y
        } else {
            y.copy()?
        };
        let shape = y.shape().clone();
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, shape)),
            _ => candle_core::bail!("checkpoint: the layer's output is not on the GPU"),
        }
    }

    /// Reruns the layer from `x` and returns d(Σ y·grad)/dx; parameter gradients go to
    /// [`PENDING`].
    fn rerun(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        RERUNS.with(|r| r.set(r.get() + 1));
        let xin = Var::from_tensor(&x.detach())?;
        let y = dropout_tape::replay(&self.masks, || (self.f)(xin.as_tensor()))?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            for param in &self.params {
                if let Some(g) = store.get(param) {
                    p.push((param.clone(), g.clone()));
                }
            }
        });
        Ok(if x.track_op() {
            store.get(xin.as_tensor()).cloned()
        } else {
            None
        })
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.take_output()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.take_output_cuda()
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.rerun(x, grad)
    }
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.take_output()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.take_output_cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.rerun(x, grad)?, None))
    }
}
