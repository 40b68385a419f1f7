//! Learning-rate schedules with linear warm-up, as transformers' `get_scheduler`:
//! the rate for optimizer step k (0-based) is `lr · λ(k)`.

/// λ(k) for `kind` in constant | linear | cosine, `warmup` steps, `total` steps.
pub fn lr_factor(kind: &str, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    match kind {
        "linear" => (1.0 - progress).max(0.0),
        "cosine" => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        _ => 1.0,
    }
}

/// Warm-up steps: explicit steps win; otherwise a ratio of the total (rounded up, as HF).
pub fn warmup_steps(steps: usize, ratio: f64, total: usize) -> usize {
    if steps > 0 {
        steps
    } else {
        (ratio * total as f64).ceil() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(lr_factor("constant", 5, 0, 10), 1.0);
        assert_eq!(lr_factor("linear", 0, 0, 10), 1.0);
        assert!((lr_factor("linear", 5, 0, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_factor("linear", 1, 2, 10), 0.5);
        assert!((lr_factor("cosine", 5, 0, 10) - 0.5).abs() < 1e-12);
        assert!((lr_factor("cosine", 10, 0, 10)).abs() < 1e-12);
        assert_eq!(warmup_steps(0, 0.1, 95), 10);
    }
}
