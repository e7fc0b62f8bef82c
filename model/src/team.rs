//! A team of threads that runs one computation together, as llama.cpp runs a decode step:
//! every member executes the same closure, takes disjoint pieces of each phase's work from a
//! shared counter, and meets the others at a spinning barrier before the next phase reads
//! what this one wrote. A token of a 30-layer model is ~150 short products; handing each to
//! a task pool costs a wake-up per product (a fifth of decode time in rayon's scheduler,
//! docs/bench-log/2026-12-03-smollm2-thread-team-prefetch.md), while members that spin meet at a barrier in well under a
//! microsecond.
//!
//! [`run`] starts the members (scoped threads: they borrow the caller's data and are joined
//! before it returns); [`Member::claims`] hands out work; [`Member::barrier`] ends a phase;
//! [`SharedBuf`] is the buffer the members write in disjoint pieces.
use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// At most one team runs at a time: a second caller (a test thread, another session on the
/// same process) runs alone instead of spinning against the first team for the same cores.
static BUSY: AtomicBool = AtomicBool::new(false);

struct State {
    size: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// One counter per list of work handed out (`Member::claims`), in the order the members
    /// ask for them.
    counters: Vec<AtomicUsize>,
    poisoned: AtomicBool,
}

/// One thread of a running team.
pub struct Member<'a> {
    pub index: usize,
    state: &'a State,
    lists: Cell<usize>,
}

impl Member<'_> {
    pub fn size(&self) -> usize {
        self.state.size
    }

    /// Waits until every member has arrived: what anyone wrote before is visible after.
    /// Panics if another member panicked (it will never arrive).
    pub fn barrier(&self) {
        let s = self.state;
        if s.size == 1 {
            return;
        }
        let generation = s.generation.load(Ordering::Acquire);
        if s.arrived.fetch_add(1, Ordering::AcqRel) + 1 == s.size {
            s.arrived.store(0, Ordering::Relaxed);
            s.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == generation {
            assert!(!s.poisoned.load(Ordering::Relaxed), "a team member panicked");
            spins += 1;
            // Spin while the others are likely running; yield if a member lost its core.
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The next list of work: pieces `chunk` long of `0..total`, each given to exactly one
    /// member (whichever asks first), so a member that was descheduled takes fewer. Every
    /// member must ask for the same lists in the same order.
    pub fn claims(&self, total: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let list = self.lists.get();
        self.lists.set(list + 1);
        let counter = self.state.counters.get(list).expect("more work lists than the team was started with");
        let chunk = chunk.max(1);
        std::iter::from_fn(move || {
            let start = counter.fetch_add(chunk, Ordering::Relaxed);
            (start < total).then(|| start..(start + chunk).min(total))
        })
    }
}

/// Marks the team poisoned if its member unwinds, so the others stop waiting for it.
struct PoisonOnPanic<'a>(&'a AtomicBool);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `work` on `size` members (the caller is member 0) and returns member 0's result.
/// `lists` bounds how many [`Member::claims`] lists the work asks for. If another team is
/// running, the caller runs the work alone (`size` 1), which every work must allow.
pub fn run<R>(size: usize, lists: usize, work: impl Fn(&Member) -> R + Sync) -> R {
    if size <= 1 || BUSY.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return start(1, lists, work);
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            BUSY.store(false, Ordering::Release);
        }
    }
    let _release = Release;
    start(size, lists, work)
}

/// [`run`] on exactly `size` members, whether or not another team is running (tests).
pub(crate) fn start<R>(size: usize, lists: usize, work: impl Fn(&Member) -> R + Sync) -> R {
    let state = State {
        size,
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        counters: (0..lists).map(|_| AtomicUsize::new(0)).collect(),
        poisoned: AtomicBool::new(false),
    };
    let member = |index| {
        let _guard = PoisonOnPanic(&state.poisoned);
        work(&Member { index, state: &state, lists: Cell::new(0) })
    };
    if size == 1 {
        return member(0);
    }
    std::thread::scope(|s| {
        for index in 1..size {
            let member = &member;
            s.spawn(move || {
                member(index);
            });
        }
        member(0)
    })
}

/// An f32 buffer that the members of a team write in disjoint pieces during a phase and
/// read whole only after the barrier that ends it. The borrow checker cannot see phases, so
/// both accesses are `unsafe` and say which rule the caller keeps.
pub struct SharedBuf<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is a plain `&mut [f32]`; the access rules below keep members from
// touching the same element while one of them writes it.
unsafe impl Send for SharedBuf<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedBuf<'_> {}

impl<'a> SharedBuf<'a> {
    pub fn new(buf: &'a mut [f32]) -> Self {
        Self { ptr: buf.as_mut_ptr(), len: buf.len(), _borrow: PhantomData }
    }

    /// Elements `range` to write.
    ///
    /// # Safety
    /// In this phase no other member reads or writes any element of `range`, and nobody
    /// holds [`Self::whole`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn piece(&self, range: Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len, "piece {range:?} of {}", self.len);
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start) }
    }

    /// The whole buffer to read.
    ///
    /// # Safety
    /// No member writes it in this phase.
    pub unsafe fn whole(&self) -> &[f32] {
        // SAFETY: the buffer's own extent; no writer by the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four members fill a buffer in claimed pieces over several phases, each phase reading
    /// what the previous one wrote: the result is what one thread computes.
    #[test]
    fn phases_see_each_others_writes() {
        let (n, phases) = (1000usize, 50usize);
        let mut a = vec![1f32; n];
        let mut b = vec![0f32; n];
        let (sa, sb) = (SharedBuf::new(&mut a), SharedBuf::new(&mut b));
        let sums = start(4, phases, |m| {
            let (src, dst) = (&sa, &sb);
            let mut sums = Vec::new();
            for p in 0..phases {
                let (src, dst) = if p % 2 == 0 { (src, dst) } else { (dst, src) };
                // SAFETY: src is only read in this phase; claimed pieces of dst are disjoint.
                let read = unsafe { src.whole() };
                let total: f32 = read.iter().sum();
                for r in m.claims(n, 7) {
                    let out = unsafe { dst.piece(r.clone()) };
                    for (o, i) in out.iter_mut().zip(r) {
                        *o = read[i] + 1.0;
                    }
                }
                sums.push(total);
                m.barrier();
            }
            sums
        });
        let want: Vec<f32> = (0..phases).map(|p| n as f32 * (p + 1) as f32).collect();
        assert_eq!(sums, want);
    }

    #[test]
    fn a_panicking_member_does_not_hang_the_others() {
        let result = std::panic::catch_unwind(|| {
            start(3, 1, |m| {
                if m.index == 2 {
                    panic!("boom");
                }
                m.barrier();
            })
        });
        assert!(result.is_err());
    }
}
