//! Buffers of dead activations handed to the next outputs of a stretch of
//! work ([`with_spare`]): an output buffer the kernels ask for
//! ([`super::activation`]) comes from them when one fits, instead of fresh
//! memory, whose pages the kernel clears on first touch (the full model's
//! VAE at 512x512 writes about 2 GB of activations of 64 to 256 MB each, too
//! large for the allocator to keep: every one was fresh pages, 8 % of the
//! frame's time in the kernel).
use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};

/// Smallest buffer worth keeping: smaller blocks the allocator reuses itself.
const MIN_BYTES: usize = 1 << 20;
/// Most bytes a [`Spare`] keeps (the smallest buffers go first past it).
const MAX_BYTES: usize = 1 << 30;

/// Dead activation buffers (f32), kept for the next outputs.
#[derive(Debug, Default)]
pub struct Spare {
    bufs: Vec<Vec<f32>>,
}

impl Spare {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.capacity() * 4).sum()
    }

    /// A buffer for `n` values: the smallest held of at least `n` and at most
    /// `2 n` (a larger one would be lost to an output that is dropped rather
    /// than handed back), at length `n`; its values are those of its last
    /// use (zero past them).
    /// On a miss the buffers under `n / 2` go: the walks' outputs grow as
    /// their resolution rises, and those would only add to the peak.
    fn take(&mut self, n: usize) -> Option<Vec<f32>> {
        let fit = (0..self.bufs.len())
            .filter(|&i| (n..=2 * n).contains(&self.bufs[i].capacity()))
            .min_by_key(|&i| self.bufs[i].capacity());
        let Some(i) = fit else {
            self.bufs.retain(|b| b.capacity() >= n / 2);
            return None;
        };
        let mut v = self.bufs.swap_remove(i);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Some(v)
    }

    /// Keep `v` (if large enough), within [`MAX_BYTES`].
    fn put(&mut self, v: Vec<f32>) {
        if v.capacity() * 4 < MIN_BYTES {
            return;
        }
        self.bufs.push(v);
        while self.bytes() > MAX_BYTES {
            let smallest = (0..self.bufs.len()).min_by_key(|&i| self.bufs[i].capacity()).expect("over the cap");
            self.bufs.swap_remove(smallest);
        }
    }
}

thread_local! {
    /// The spare of the work this thread runs now ([`with_spare`]).
    static ACTIVE: RefCell<Option<Spare>> = const { RefCell::new(None) };
}

/// Run `f` with `spare` serving this thread's output buffers
/// ([`super::activation`]) and taking the tensors [`give_back`] hands it;
/// what it holds at the end stays in `spare`.
pub fn with_spare<T>(spare: &mut Spare, f: impl FnOnce() -> T) -> T {
    struct Restore<'a>(&'a mut Spare, Option<Spare>);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            *self.0 = ACTIVE.replace(self.1.take()).unwrap_or_default();
        }
    }
    let previous = ACTIVE.replace(Some(std::mem::take(spare)));
    let _restore = Restore(spare, previous);
    f()
}

/// A buffer of `n` values from the active spare, if one fits.
pub(super) fn take(n: usize) -> Option<Vec<f32>> {
    if n * 4 < MIN_BYTES {
        return None;
    }
    ACTIVE.with_borrow_mut(|s| s.as_mut().and_then(|s| s.take(n)))
}

/// Takes the vector out of a tensor's storage.
struct Take(Mutex<Vec<f32>>);

impl InplaceOp1 for Take {
    fn name(&self) -> &'static str {
        "codiff-take-buffer"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        if let CpuStorage::F32(v) = s {
            // the whole storage, not a view into part of it
            if l.start_offset() == 0 && l.is_contiguous() && l.shape().elem_count() == v.len() {
                *self.0.lock().unwrap_or_else(|e| e.into_inner()) = std::mem::take(v);
            }
        }
        Ok(())
    }
}

/// `t` is dead and no other tensor shares its storage: its buffer goes to
/// the active spare (where there is one, `t` a whole f32 CPU tensor; else
/// it is simply dropped). `t` is left empty.
pub fn give_back(t: Tensor) {
    let active = ACTIVE.with_borrow(|s| s.is_some());
    if !active || !t.device().is_cpu() || t.dtype() != DType::F32 {
        return;
    }
    let take = Take(Mutex::new(Vec::new()));
    if t.inplace_op1(&take).is_ok() {
        let v = take.0.into_inner().unwrap_or_else(|e| e.into_inner());
        ACTIVE.with_borrow_mut(|s| {
            if let Some(s) = s.as_mut() {
                s.put(v)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dead_buffers_serve_outputs_that_fit_and_stay_in_the_spare() {
        let n = MIN_BYTES / 4 * 3;
        let mut spare = Spare::default();
        let dead = Tensor::from_vec(vec![7f32; n], n, &Device::Cpu).unwrap();
        let ptr = with_spare(&mut spare, || {
            let ptr = {
                let (s, _) = dead.storage_and_layout();
                match &*s {
                    candle_core::Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr(),
                    _ => unreachable!(),
                }
            };
            give_back(dead);
            // too large for it, then one that fits (at most twice smaller)
            assert!(take(n + 1).is_none());
            assert!(take(n / 2 - 1).is_none());
            let v = take(n / 2 + 1).expect("fits");
            assert_eq!((v.as_ptr(), v.len()), (ptr, n / 2 + 1));
            assert!(v.iter().all(|&x| x == 7.0), "values of its last use");
            // handed back again, it grows to a length past its last one
            give_back(Tensor::from_vec(v, n / 2 + 1, &Device::Cpu).unwrap());
            let v = take(n).expect("fits");
            assert_eq!((v.as_ptr(), v.len()), (ptr, n));
            assert!(v[..n / 2 + 1].iter().all(|&x| x == 7.0) && v[n / 2 + 1..].iter().all(|&x| x == 0.0));
            give_back(Tensor::from_vec(v, n, &Device::Cpu).unwrap());
            ptr
        });
        assert_eq!(spare.bytes(), spare.bufs[0].capacity() * 4);
        assert_eq!(spare.bufs[0].as_ptr(), ptr);
        // without an active spare nothing is taken or kept
        assert!(take(n).is_none());
        give_back(Tensor::from_vec(vec![0f32; n], n, &Device::Cpu).unwrap());
        assert_eq!(spare.bufs.len(), 1);
        // a view is not the whole storage: left alone
        with_spare(&mut spare, || {
            let t = Tensor::from_vec(vec![1f32; 2 * n], 2 * n, &Device::Cpu).unwrap();
            give_back(t.narrow(0, 1, n).unwrap());
            assert_eq!(t.get(2 * n - 1).unwrap().to_scalar::<f32>().unwrap(), 1.0);
        });
        assert_eq!(spare.bufs.len(), 1);
    }
}
