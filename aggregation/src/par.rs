//! Optional data parallelism (feature `rayon`); sequential otherwise, so the
//! default build spawns no threads.

/// `items.iter().map(f).collect()`, in parallel with the `rayon` feature.
pub(crate) fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        items.par_iter().map(f).collect()
    }
    #[cfg(not(feature = "rayon"))]
    {
        items.iter().map(f).collect()
    }
}

/// Calls `f(index, chunk)` for each `size`-element chunk of `data`, in
/// parallel with the `rayon` feature.
pub(crate) fn for_each_chunk<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        data.par_chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
    #[cfg(not(feature = "rayon"))]
    {
        data.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}
