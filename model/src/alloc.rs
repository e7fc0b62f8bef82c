//! Process-wide allocator tuning for tensor workloads.

/// glibc's malloc serves blocks above its mmap threshold (32 MiB at most) with fresh `mmap`s
/// and returns freed memory at the top of its heaps to the kernel, so the large buffers a
/// training step allocates on every op are page-faulted in and zeroed by the kernel again
/// each time. Serving everything from the heaps and never trimming them keeps those pages:
/// the process holds on to its peak working set, as GPU caching allocators do. Measured on
/// the pretraining step (docs/BENCHMARKS.md): faster than glibc's defaults and than mimalloc.
/// Call first thing in `main`; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
