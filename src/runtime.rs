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
