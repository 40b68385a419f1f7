//! Keeps freed tensor buffers in the process instead of handing them back to the kernel.
//!
//! glibc serves large allocations (above a dynamic threshold that tops out at 32 MiB) with a
//! fresh `mmap` and returns them with `munmap` on free. A training step allocates and frees
//! hundreds of activation-sized buffers, so every step re-faults and re-zeroes the same pages:
//! profiled at ~20 % of a DPO step's time on the bench config (page faults, TLB shootdowns,
//! `clear_page`). Serving them from the heap and not trimming it lets the next step reuse the
//! pages. Peak RSS is unchanged (the same buffers are live at the peak); the process just
//! keeps its high-water mark mapped until it exits.

/// Call once, before the first tensor is allocated.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before any
    // other thread exists and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
