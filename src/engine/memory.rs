//! How much memory a frame needs, and how much the process may still take.
//!
//! An allocation that fails aborts the process (Rust's allocator does not
//! return an error), so a frame too large for the memory at hand must be
//! refused before anything is allocated for it. The need is estimated from
//! measured peaks (`cargo run --release --example bench`, README); what is
//! available is the least of the address-space limit (`ulimit -v`) left, the
//! cgroup's memory limit left (containers) and the system's MemAvailable.

/// Frame-sized buffers per pixel, whatever the tiling: the input and output
/// tensors (f32 RGB, 12 bytes each), padding, the guard's YCbCr planes of the
/// input and the result (24 bytes), the packed RGB copies (9 bytes) and a
/// host's conversion planes (f32, 12 bytes).
const FRAME_BYTES_PER_PIXEL: u64 = 96;
/// CaVE reconstruction activations per pixel of a tile (the compact model:
/// 189 MB peak at 1280x720 untiled, 398 MB at 1920x1080, less the frame-sized
/// buffers and the model).
const CAVE_BYTES_PER_TILE_PIXEL: u64 = 160;
/// Diffusion mode per pixel of the frame (VAE and UNet activations; the
/// official model at 3840x2160 is estimated at 15-16 GB with VAEHook tiling).
const DIFFUSION_BYTES_PER_PIXEL: u64 = 1500;

/// Bytes a `width` x `height` frame is expected to need at its peak: in cave
/// mode the frame-sized buffers and one CaVE tile of at most `cave_tile`
/// square (0: the whole frame); in diffusion mode much more.
pub fn frame_bytes(width: usize, height: usize, cave_tile: usize, diffusion: bool) -> u64 {
    let px = width as u64 * height as u64;
    let tile_px = if cave_tile == 0 { px } else { px.min(cave_tile as u64 * cave_tile as u64) };
    let model = if diffusion { DIFFUSION_BYTES_PER_PIXEL * px } else { CAVE_BYTES_PER_TILE_PIXEL * tile_px };
    FRAME_BYTES_PER_PIXEL * px + model
}

/// Bytes this process can still allocate, by the tightest of its limits
/// (None when none can be read).
pub fn available_bytes() -> Option<u64> {
    [address_space_left(), cgroup_left(), mem_available()].into_iter().flatten().min()
}

fn status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// RLIMIT_AS minus the address space in use (VmSize).
fn address_space_left() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the limits into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let used = status_kb(&std::fs::read_to_string("/proc/self/status").ok()?, "VmSize:")? * 1024;
    Some(lim.rlim_cur.saturating_sub(used))
}

/// The cgroup (v2) memory limit minus its current use.
fn cgroup_left() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max: u64 = std::fs::read_to_string(dir.join("memory.max")).ok()?.trim().parse().ok()?;
    let current: u64 = std::fs::read_to_string(dir.join("memory.current")).ok()?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

fn mem_available() -> Option<u64> {
    Some(status_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")? * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_the_frame_and_tiles_bound_them() {
        let hd = frame_bytes(1280, 720, 2048, false);
        assert!((150 << 20..400 << 20).contains(&hd), "{hd}");
        let huge = frame_bytes(8000, 8000, 2048, false);
        let untiled = frame_bytes(8000, 8000, 0, false);
        assert!(huge > 5_000_000_000 && untiled > huge);
        assert!(frame_bytes(1280, 720, 2048, true) > hd);
    }

    #[test]
    fn this_process_has_some_memory_left() {
        let left = available_bytes().expect("MemAvailable is readable on Linux");
        assert!(left > 1 << 20, "{left}");
    }
}
