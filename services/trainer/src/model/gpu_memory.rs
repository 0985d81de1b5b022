//! The GPU memory a run takes, as the driver sees it: NVML's "device memory used", sampled
//! every few milliseconds on a thread while the run trains, minus what was used before it
//! started. That is the number that decides whether a job fits on a card (it counts the CUDA
//! context and everything libtorch's caching allocator holds, not only live tensors), and the
//! one the GPU benchmark (bench/gpu.md) measures for every trainer alike.
//!
//! NVML is opened at run time (`dlopen` of `libnvidia-ml.so.1`, which the NVIDIA driver
//! installs), so the trainer builds and runs where there is no driver; there, and on the CPU,
//! there is no monitor and the reported peak is `null`.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tch::Device;

/// How often the sampling thread reads the device's memory: short enough to catch the peak of
/// a backward pass (a step takes 100 ms or more on the shapes that matter), and NVML's
/// query costs microseconds.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

type NvmlDevice = *mut c_void;

type Init = unsafe extern "C" fn() -> c_int;
type ByIndex = unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> c_int;
type ByUuid = unsafe extern "C" fn(*const c_char, *mut NvmlDevice) -> c_int;
type MemoryInfo = unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> c_int;

/// The few NVML entry points the monitor calls.
struct Nvml {
    by_index: ByIndex,
    by_uuid: ByUuid,
    memory_info: MemoryInfo,
}

// glibc's dynamic loader (in libc itself since glibc 2.34).
unsafe extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;

impl Nvml {
    /// NVML, loaded and initialised once per process; `None` where there is no driver.
    fn get() -> Option<&'static Nvml> {
        static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
        NVML.get_or_init(|| {
            // SAFETY: the symbols are NVML's documented C API, called with their signatures;
            // the library stays loaded for the life of the process (never dlclose'd).
            unsafe {
                let lib = dlopen(c"libnvidia-ml.so.1".as_ptr(), RTLD_NOW);
                if lib.is_null() {
                    return None;
                }
                let sym = |name: &std::ffi::CStr| {
                    let f = dlsym(lib, name.as_ptr());
                    (!f.is_null()).then_some(f)
                };
                let init = std::mem::transmute::<*mut c_void, Init>(sym(c"nvmlInit_v2")?);
                if init() != 0 {
                    return None;
                }
                Some(Nvml {
                    by_index: std::mem::transmute::<*mut c_void, ByIndex>(sym(
                        c"nvmlDeviceGetHandleByIndex_v2",
                    )?),
                    by_uuid: std::mem::transmute::<*mut c_void, ByUuid>(sym(
                        c"nvmlDeviceGetHandleByUUID",
                    )?),
                    memory_info: std::mem::transmute::<*mut c_void, MemoryInfo>(sym(
                        c"nvmlDeviceGetMemoryInfo",
                    )?),
                })
            }
        })
        .as_ref()
    }

    /// NVML's handle of CUDA device `cuda_index`. NVML counts every GPU of the machine;
    /// CUDA only those in `CUDA_VISIBLE_DEVICES` (indices or `GPU-…` UUIDs), in its order.
    fn device(&self, cuda_index: usize) -> Option<NvmlDevice> {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let entry = match &visible {
            Some(list) => list.split(',').nth(cuda_index)?.trim().to_string(),
            None => cuda_index.to_string(),
        };
        let mut handle: NvmlDevice = std::ptr::null_mut();
        // SAFETY: NVML writes one handle through the pointer it is given.
        let status = unsafe {
            match entry.parse::<c_uint>() {
                Ok(index) => (self.by_index)(index, &mut handle),
                Err(_) => {
                    let uuid = CString::new(entry).ok()?;
                    (self.by_uuid)(uuid.as_ptr(), &mut handle)
                }
            }
        };
        (status == 0).then_some(handle)
    }

    fn used(&self, device: NvmlDevice) -> Option<u64> {
        let mut memory = NvmlMemory::default();
        // SAFETY: `device` came from NVML; it fills the struct it is given.
        let status = unsafe { (self.memory_info)(device, &mut memory) };
        (status == 0).then_some(memory.used)
    }
}

/// Samples a GPU's memory on a thread from [`GpuMemoryMonitor::start`] until dropped.
pub struct GpuMemoryMonitor {
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl GpuMemoryMonitor {
    /// Starts sampling `device`, with what it uses now as the baseline; `None` on the CPU or
    /// where NVML cannot be loaded or does not know the device.
    pub fn start(device: Device) -> Option<GpuMemoryMonitor> {
        let Device::Cuda(index) = device else {
            return None;
        };
        let nvml = Nvml::get()?;
        let handle = nvml.device(index)?;
        let baseline = nvml.used(handle)?;
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        // The handle is an opaque NVML pointer, valid in any thread.
        let handle_bits = handle as usize;
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::Builder::new()
                .name("gpu-memory".into())
                .spawn(move || {
                    let handle = handle_bits as NvmlDevice;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(used) = nvml.used(handle) {
                            peak.fetch_max(used, Ordering::Relaxed);
                        }
                        std::thread::sleep(SAMPLE_EVERY);
                    }
                })
                .ok()?
        };
        Some(GpuMemoryMonitor {
            baseline,
            peak,
            stop,
            thread: Some(thread),
        })
    }

    /// The most device memory used so far, minus the baseline, in bytes.
    pub fn peak_bytes(&self) -> u64 {
        self.peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline)
    }
}

impl Drop for GpuMemoryMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_gpu_memory_monitor() {
        assert!(GpuMemoryMonitor::start(Device::Cpu).is_none());
    }
}
