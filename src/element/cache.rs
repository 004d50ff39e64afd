//! Process-wide model cache: elements asking for the same files on the same device
//! share one loaded [`Engine`].
//!
//! The cache holds only [`Weak`] references: a model lives as long as some element
//! holds its [`Arc`] (from NULL->READY to READY->NULL) and is freed with the last
//! one. Each key has its own slot lock, so two elements loading the same model wait
//! for one load, while different models load in parallel.
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use crate::engine::{Engine, EngineError, ModelSpec};

/// Lock a mutex, going on with its data if a panicking thread poisoned it (every
/// value stored here stays consistent across a panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A map from key to a weakly held, lazily loaded value.
pub struct Cache<K, V> {
    slots: Mutex<HashMap<K, Arc<Mutex<Weak<V>>>>>,
    loads: AtomicUsize,
}

impl<K: Eq + Hash + Clone, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self { slots: Mutex::new(HashMap::new()), loads: AtomicUsize::new(0) }
    }
}

impl<K: Eq + Hash + Clone, V> Cache<K, V> {
    /// The live value for `key`, or a new one from `load`. Returns the value and
    /// whether `load` ran. A failed load caches nothing.
    pub fn get_or_load<E>(&self, key: &K, load: impl FnOnce() -> Result<V, E>) -> Result<(Arc<V>, bool), E> {
        let slot = {
            let mut slots = lock(&self.slots);
            // Forget keys whose value is gone and that nobody is loading.
            slots.retain(|k, s| k == key || Arc::strong_count(s) > 1 || lock(s).strong_count() > 0);
            slots.entry(key.clone()).or_default().clone()
        };
        let mut weak = lock(&slot);
        if let Some(v) = weak.upgrade() {
            return Ok((v, false));
        }
        let v = Arc::new(load()?);
        *weak = Arc::downgrade(&v);
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok((v, true))
    }

    /// How many loads succeeded since the process started.
    pub fn load_count(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    /// Whether a live value for `key` is cached.
    pub fn contains(&self, key: &K) -> bool {
        lock(&self.slots).get(key).is_some_and(|s| lock(s).strong_count() > 0)
    }
}

static ENGINES: LazyLock<Cache<ModelSpec, Engine>> = LazyLock::new(Cache::default);

/// The shared engine for `spec`, loading it (with `progress` reports) if no element
/// holds it. Returns whether this call loaded it.
pub fn engine(spec: &ModelSpec, progress: &mut dyn FnMut(&str)) -> Result<(Arc<Engine>, bool), EngineError> {
    ENGINES.get_or_load(spec, || Engine::load(spec, progress))
}

/// Successful model loads in this process (tests use it to prove that caps changes
/// and second elements reuse a loaded model).
pub fn load_count() -> usize {
    ENGINES.load_count()
}

/// Whether some element currently holds a model loaded for `spec`.
pub fn is_loaded(spec: &ModelSpec) -> bool {
    ENGINES.contains(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn same_key_shares_one_value_until_the_last_user_drops_it() {
        let cache: Cache<&str, String> = Cache::default();
        let (a, loaded_a) = cache.get_or_load(&"k", || Ok::<_, ()>("v".to_string())).unwrap();
        let (b, loaded_b) = cache.get_or_load(&"k", || Ok::<_, ()>("other".to_string())).unwrap();
        assert!(loaded_a && !loaded_b);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.load_count(), 1);
        drop(a);
        assert!(cache.contains(&"k"));
        drop(b);
        assert!(!cache.contains(&"k"));
        let (c, loaded_c) = cache.get_or_load(&"k", || Ok::<_, ()>("again".to_string())).unwrap();
        assert!(loaded_c);
        assert_eq!(*c, "again");
        assert_eq!(cache.load_count(), 2);
    }

    #[test]
    fn different_keys_load_separately_and_errors_are_not_cached() {
        let cache: Cache<u32, u32> = Cache::default();
        assert_eq!(cache.get_or_load(&1, || Err::<u32, _>("boom")).unwrap_err(), "boom");
        let (one, _) = cache.get_or_load(&1, || Ok::<_, ()>(10)).unwrap();
        let (two, _) = cache.get_or_load(&2, || Ok::<_, ()>(20)).unwrap();
        assert_eq!((*one, *two), (10, 20));
        assert_eq!(cache.load_count(), 2);
    }

    #[test]
    fn concurrent_requests_for_one_key_load_once() {
        let cache: Arc<Cache<u8, usize>> = Arc::default();
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_load(&0, || {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok::<_, ()>(i)
                        })
                        .unwrap()
                        .0
                })
            })
            .collect();
        let values: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(values.iter().all(|v| Arc::ptr_eq(v, &values[0])));
        assert_eq!(cache.load_count(), 1);
    }

    #[test]
    fn a_panicking_load_leaves_the_cache_usable() {
        let cache: Cache<u8, u8> = Cache::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get_or_load(&0, || -> Result<u8, ()> { panic!("loader panicked") });
        }));
        assert!(r.is_err());
        assert_eq!(*cache.get_or_load(&0, || Ok::<_, ()>(5)).unwrap().0, 5);
    }
}
