//! Process-wide allocator tuning for tensor workloads.

/// glibc's malloc serves blocks above its mmap threshold (32 MiB at most) with fresh `mmap`s
/// and returns freed memory at the top of its heaps to the kernel, so the large buffers a
/// training step allocates on every op are page-faulted in and zeroed by the kernel again
/// each time. Serving everything from the heaps and never trimming them keeps those pages:
/// the process holds on to its peak working set, as GPU caching allocators do. Measured on
/// the pretraining step (docs/bench-log/2026-11-26-allocator-side-step-flops.md): faster than glibc's defaults and than mimalloc.
/// Call first thing in `main`; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The opposite, for long-running servers (`spa-coordinator serve`): large blocks (128 KiB
/// and up) get their own mappings and go back to the kernel when freed, heaps are trimmed
/// above 128 KiB free, and there is one heap per core (glibc's default is eight). With
/// glibc's defaults the coordinator's resident memory grew round after round under 1000
/// devices (a transient 215 KB vector per masked upload, between long-lived replay-cache
/// entries, and a mmap threshold that rises to 32 MiB after the first large free): 123 ->
/// 514 MB over 10 rounds; with these, 231-259 MB from round 3 on (docs/bench-log/2026-12-03-1000-devices-service-memory.md).
/// Call first thing in `main`; a no-op off glibc.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
            libc::mallopt(libc::M_ARENA_MAX, cores as i32);
        }
    }
}
