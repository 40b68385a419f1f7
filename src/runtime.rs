//! Process-wide settings the `leash` binary applies before its first tensor op.
//!
//! 1. Keep freed tensor buffers in the process instead of handing them back to the kernel.
//!    glibc serves large allocations (above a dynamic threshold that tops out at 32 MiB)
//!    with a fresh `mmap` and returns them with `munmap` on free. A training step allocates
//!    and frees hundreds of activation-sized buffers, so every step re-faulted and re-zeroed
//!    the same pages: ~20 % of a DPO step's time on the bench config (page faults, TLB
//!    shootdowns, `clear_page`). Serving them from the heap and not trimming it lets the next
//!    step reuse the pages. Peak RSS is unchanged (the same buffers are live at the peak).
//!    `LEASH_SYSTEM_ALLOCATOR=1` keeps glibc's defaults.
//!
//! 2. Let candle's idle worker threads park after 100 spins instead of 25,000. On a quiet
//!    machine this costs nothing measurable (bench DPO step 4,746 vs 4,661–4,737 tok/s); with
//!    the other core busy, spinning workers take CPU time from the threads doing the work:
//!    2-thread DPO steps went from 2,362 to 2,804 tok/s (BENCHMARKS.md, thread behaviour).
//!    An explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` is respected.

/// Call once, at the start of `main`, before any other thread exists.
pub fn configure_process() {
    if std::env::var_os("LEASH_SYSTEM_ALLOCATOR").is_none() {
        keep_freed_memory();
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before any
    // other thread exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Peak resident memory of this process so far, in MiB: the kernel's high-water mark VmHWM
/// (/proc/self/status), else `getrusage`'s `ru_maxrss`. VmHWM first because Linux carries
/// `ru_maxrss` across `exec` from the forked parent: a leash started from a 600 MB Python
/// harness would report at least 600 MB (measured: 74 MiB under `cargo test` for a 22 MiB
/// run).
pub fn peak_rss_mib() -> Option<f64> {
    vm_hwm_mib().or_else(max_rss_mib)
}

fn vm_hwm_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `getrusage(RUSAGE_SELF)`'s `ru_maxrss` (KiB on Linux) in MiB.
fn max_rss_mib() -> Option<f64> {
    // SAFETY: getrusage writes one `rusage` struct to the pointer we own; zeroed is a valid
    // initial value for this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (rc == 0).then(|| usage.ru_maxrss as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    /// Touching more memory than the peak so far raises the reported peak past it, and the
    /// figure never exceeds getrusage's (which also counts the pre-exec parent).
    #[test]
    fn peak_rss_follows_allocations() {
        let before = super::peak_rss_mib().unwrap();
        let block = vec![1u8; (before as usize + 64) << 20];
        let after = super::peak_rss_mib().unwrap();
        assert!(after >= before + 60.0, "{before} -> {after}");
        let rusage = super::max_rss_mib().unwrap();
        assert!(after <= rusage + 1.0, "{after} vs ru_maxrss {rusage}");
        assert_eq!(block[block.len() - 1], 1);
    }
}
