//! `--device auto|cpu|cuda|cuda:N`: where a command runs its model. The flag and the TOML key
//! are parsed here, and resolved to a candle [`Device`] here and nowhere else, before any
//! output is written, so a device that cannot be had leaves nothing half-written. Also the one
//! place that recognises the GPU running out of memory ([`out_of_memory`]).
//!
//! `auto` is the GPU when this binary was built with `--features cuda` and a GPU answers, else
//! the CPU. candle always has `Device::new_cuda`; without the feature it returns an error and
//! `cuda_is_available()` is false, so this file needs no `cfg`: the same code serves both builds.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::{Device, DeviceLocation};
use serde::{Deserialize, Serialize};

use crate::error::{LeashError, Result};

/// The accepted spellings, for error messages and help.
pub const ACCEPTED: &str = "auto, cpu, cuda (the first GPU) or cuda:N (GPU N, counted from 0)";

/// What the user asked for. `cuda` is `cuda:0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not a device; accepted: {ACCEPTED}");
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                // `parse` takes a leading `+`; an index is plain digits.
                Some(Ok(n)) if s["cuda:".len()..].bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(DeviceChoice::Cuda(n))
                }
                _ => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(c: DeviceChoice) -> String {
        c.to_string()
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// The choice that names `device` exactly (what a run's resolved config records).
    pub fn of(device: &Device) -> DeviceChoice {
        match device.location() {
            DeviceLocation::Cuda { gpu_id } => DeviceChoice::Cuda(gpu_id),
            _ => DeviceChoice::Cpu,
        }
    }
}

/// `--device`, flattened into every command that runs a model (the trainers take it through
/// `TrainArgs`, where it can also come from `--config`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct DeviceArg {
    /// Where the model runs: auto (the GPU when this binary is built with `--features cuda` and
    /// a GPU is present, else the CPU), cpu, cuda (the first GPU) or cuda:N.
    #[arg(long, default_value = "auto", value_parser = DeviceChoice::from_str)]
    pub device: DeviceChoice,
}

impl DeviceArg {
    /// Resolves the choice and prints the first line of output, `device: …`.
    pub fn open(&self) -> Result<Device> {
        let device = resolve(self.device)?;
        eprintln!("{}", describe(&device));
        Ok(device)
    }
}

/// GPUs opened so far. candle makes a new context per `new_cuda` call and refuses ops between
/// tensors of two of them, so every part of a process (the demo's runs, a trainer's eval) must
/// get the same one.
static OPENED: Mutex<Vec<(usize, Device)>> = Mutex::new(Vec::new());

/// The device `choice` names, or an error with a hint (exit 2) when it cannot be had.
pub fn resolve(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !candle_core::utils::cuda_is_available() => Ok(Device::Cpu),
        // A CUDA build on a machine without a usable GPU: auto means "the CPU, then".
        DeviceChoice::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        DeviceChoice::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(LeashError::usage(
                    format!("--device {choice}: this leash binary was built without CUDA support"),
                    "build it with `cargo build --release --features cuda` (needs the CUDA toolkit's nvcc), or run on the CPU with --device cpu (or --device auto)",
                ));
            }
            cuda(n).map_err(|detail| unavailable(n, &detail, count(n)))
        }
    }
}

/// GPU `n`, opened once per process.
fn cuda(n: usize) -> std::result::Result<Device, String> {
    let mut opened = OPENED.lock().map_err(|e| e.to_string())?;
    if let Some((_, d)) = opened.iter().find(|(i, _)| *i == n) {
        return Ok(d.clone());
    }
    let device = open(n)?;
    opened.push((n, device.clone()));
    Ok(device)
}

/// `Device::new_cuda(n)`. cudarc opens libcuda at run time and panics when it cannot (no
/// driver); that panic is caught here and becomes an error like any other.
fn open(n: usize) -> std::result::Result<Device, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the CUDA driver could not be loaded".into())),
    }
}

/// How many GPUs answer, counting up from 0 and stopping below `limit` (only asked after
/// GPU `limit` failed, to say how many there are).
fn count(limit: usize) -> usize {
    (0..limit).take_while(|&i| cuda(i).is_ok()).count()
}

/// The error for GPU `n` that failed with `detail`, where GPUs 0 … `gpus` − 1 answer.
fn unavailable(n: usize, detail: &str, gpus: usize) -> LeashError {
    if is_out_of_memory(detail) {
        return out_of_memory(detail);
    }
    let no_driver = [
        "libcuda",
        "dynamically load",
        "CUDA_ERROR_INSUFFICIENT_DRIVER",
    ]
    .iter()
    .any(|k| detail.contains(k));
    if no_driver {
        return LeashError::usage(
            format!("--device cuda:{n}: the NVIDIA driver could not be loaded ({detail})"),
            "install the NVIDIA driver (`nvidia-smi` should list the GPU), or run on the CPU with --device cpu",
        );
    }
    let invalid = detail.contains("CUDA_ERROR_INVALID_DEVICE");
    if detail.contains("CUDA_ERROR_NO_DEVICE") || (gpus == 0 && (n > 0 || invalid)) {
        return LeashError::usage(
            format!("--device cuda:{n}: no CUDA GPU found ({detail})"),
            "check `nvidia-smi` lists a GPU and CUDA_VISIBLE_DEVICES does not hide it, or run on the CPU with --device cpu",
        );
    }
    if n > 0 && (gpus < n || (gpus == n && invalid)) {
        let plural = if gpus == 1 { "" } else { "s" };
        return LeashError::usage(
            format!("--device cuda:{n}: GPU index {n} is out of range: this machine has {gpus} GPU{plural}"),
            format!("GPUs count from 0: pick one of cuda:0 … cuda:{}", gpus - 1),
        );
    }
    LeashError::usage(
        format!("--device cuda:{n}: cannot open the GPU ({detail})"),
        "check `nvidia-smi` shows the GPU healthy and not in exclusive use by another process, or run on the CPU with --device cpu",
    )
}

/// The first line of a command's output: `device: cpu (2 threads)` or `device: cuda:0`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => format!(
            "device: cpu ({} threads)",
            candle_core::utils::get_num_threads()
        ),
        DeviceLocation::Cuda { gpu_id } => format!("device: cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("device: metal:{gpu_id}"),
    }
}

/// Whether an error's text is CUDA running out of memory (cudarc's `CUDA_ERROR_OUT_OF_MEMORY`,
/// cuBLAS's and candle's allocation failures).
pub fn is_out_of_memory(text: &str) -> bool {
    text.contains("CUDA_ERROR_OUT_OF_MEMORY")
        || text.contains("CUBLAS_STATUS_ALLOC_FAILED")
        || text.to_ascii_lowercase().contains("out of memory")
}

/// The error users get when the GPU runs out of memory: what to turn down.
pub fn out_of_memory(detail: &str) -> LeashError {
    LeashError::OutOfMemory {
        message: format!("the GPU ran out of memory ({})", detail.trim()),
        hint: "lower per_device_train_batch_size (--per-device-train-batch-size; raise --gradient-accumulation-steps to keep the effective batch), add --gradient-checkpointing, keep --bf16 on (the GPU default: bf16 products) and hold the frozen reference and LoRA base in bf16 (--frozen-dtype bf16); --max-length bounds the longest sequence".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form_and_nothing_else() {
        let ok = [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:0", DeviceChoice::Cuda(0)),
            ("cuda:12", DeviceChoice::Cuda(12)),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(want), "{s}");
        }
        for s in [
            "gpu", "cuda:x", "cuda:", "cuda:+1", "cuda:-1", "CPU", "cuda0", " cpu", "",
        ] {
            let err = s.parse::<DeviceChoice>().unwrap_err();
            assert!(
                err.contains(ACCEPTED) && err.contains(&format!("`{s}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn round_trips_through_text_and_serde() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(3)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>(), Ok(c));
            let json = serde_json::to_value(c).unwrap();
            assert_eq!(json, serde_json::Value::from(c.to_string()));
            assert_eq!(serde_json::from_value::<DeviceChoice>(json).unwrap(), c);
        }
        assert_eq!(DeviceChoice::Cuda(0).to_string(), "cuda:0");
        assert!(serde_json::from_value::<DeviceChoice>("gpu".into()).is_err());
    }

    /// This test binary is built without the `cuda` feature: auto and cpu are the CPU, and
    /// asking for a GPU is an error that says how to get one.
    #[test]
    fn without_cuda_auto_is_the_cpu_and_cuda_is_refused() {
        assert!(!candle_core::utils::cuda_is_available());
        assert!(resolve(DeviceChoice::Auto).unwrap().is_cpu());
        assert!(resolve(DeviceChoice::Cpu).unwrap().is_cpu());
        assert_eq!(DeviceChoice::of(&Device::Cpu), DeviceChoice::Cpu);
        for c in [DeviceChoice::Cuda(0), DeviceChoice::Cuda(1)] {
            let err = resolve(c).unwrap_err().to_string();
            assert!(err.contains("built without CUDA support"), "{err}");
            assert!(
                err.contains("hint:") && err.contains("--features cuda"),
                "{err}"
            );
            assert!(err.contains("--device cpu"), "{err}");
        }
    }

    #[test]
    fn describes_the_cpu_with_its_threads() {
        let line = describe(&Device::Cpu);
        let n = candle_core::utils::get_num_threads();
        assert_eq!(line, format!("device: cpu ({n} threads)"));
    }

    /// What each way of failing to open a GPU says (cudarc's error texts).
    #[test]
    fn gpu_failures_name_the_cause() {
        let range = unavailable(
            3,
            "DriverError(CUDA_ERROR_INVALID_DEVICE, \"invalid device ordinal\")",
            2,
        )
        .to_string();
        assert!(
            range.contains("GPU index 3 is out of range: this machine has 2 GPUs"),
            "{range}"
        );
        assert!(
            range.contains("hint: GPUs count from 0: pick one of cuda:0 … cuda:1"),
            "{range}"
        );
        let one = unavailable(1, "CUDA_ERROR_INVALID_DEVICE", 1).to_string();
        assert!(one.contains("has 1 GPU\n"), "{one}");
        let zero = unavailable(2, "CUDA_ERROR_INVALID_DEVICE", 0).to_string();
        assert!(zero.contains("no CUDA GPU found"), "{zero}");
        let none0 = unavailable(0, "CUDA_ERROR_INVALID_DEVICE", 0).to_string();
        assert!(none0.contains("no CUDA GPU found"), "{none0}");
        let none = unavailable(
            0,
            "DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")",
            0,
        )
        .to_string();
        assert!(
            none.contains("no CUDA GPU found") && none.contains("nvidia-smi"),
            "{none}"
        );
        let driver = unavailable(
            0,
            "Unable to dynamically load the \"cuda\" shared library - searched for library names: [\"libcuda.so\"]",
            0,
        )
        .to_string();
        assert!(
            driver.contains("NVIDIA driver could not be loaded") && driver.contains("hint:"),
            "{driver}"
        );
        let busy = unavailable(0, "CUDA_ERROR_DEVICES_UNAVAILABLE", 0).to_string();
        assert!(
            busy.contains("cannot open the GPU") && busy.contains("hint:"),
            "{busy}"
        );
        let oom = unavailable(
            0,
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            1,
        );
        assert!(matches!(oom, LeashError::OutOfMemory { .. }), "{oom}");
    }

    #[test]
    fn out_of_memory_is_recognised_and_says_what_to_lower() {
        for text in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cublas error: CUBLAS_STATUS_ALLOC_FAILED",
            "CUDA out of memory",
        ] {
            assert!(is_out_of_memory(text), "{text}");
        }
        assert!(!is_out_of_memory("shape mismatch in matmul"));
        // Every candle error a `?` turns into a LeashError is checked.
        let from_cuda = candle_core::Error::Cuda(Box::new(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )));
        assert!(matches!(
            LeashError::from(from_cuda),
            LeashError::OutOfMemory { .. }
        ));
        let other = LeashError::from(candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(other, LeashError::Tensor(_)));
        let err = out_of_memory("CUDA_ERROR_OUT_OF_MEMORY").to_string();
        for needle in [
            "ran out of memory",
            "hint:",
            "per_device_train_batch_size",
            "--gradient-checkpointing",
            "--bf16",
            "--frozen-dtype bf16",
        ] {
            assert!(err.contains(needle), "missing {needle}: {err}");
        }
    }
}
