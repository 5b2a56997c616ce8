//! Device-to-host copies through page-locked staging memory, one staging buffer per host
//! thread at a time (kept in a pool across the executor's per-step threads). A copy into
//! pageable memory holds up every other thread's pageable download in the driver until it
//! completes: `moelab calibrate`'s host-copy probe (H200, 2026-11-24) timed a 4 KiB pageable
//! download on an idle stream at 4.1 ms while another thread's download waited behind queued
//! GEMMs (25 us alone), a pinned one at 24 us. The cuda executor's stream threads download
//! routing tables and counts while the comm thread waits in count exchanges, so their small
//! downloads go through here. `MOELAB_PAGEABLE_DOWNLOADS=1` restores pageable copies (for A/B
//! runs).

use cudarc::driver::{result, CudaStream, DeviceRepr};
use moelab_kernels::error::GpuError;
use std::cell::RefCell;
use std::ffi::c_void;

/// Largest copy staged (bytes); larger ones (whole activations for a cross-check) go straight
/// to pageable memory rather than pinning that much host memory per thread.
pub const PINNED_STAGING_MAX_BYTES: usize = 64 << 20;

/// A page-locked staging buffer.
struct Staging {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: page-locked host memory may be used from any thread; a Staging is used by one
// thread at a time (its thread's slot, or the pool between threads).
unsafe impl Send for Staging {}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by malloc_host and freed once; a failure (the context already
            // gone at process exit) leaves nothing to do.
            let _ = unsafe { result::free_host(self.ptr) };
        }
    }
}

/// Staging buffers of threads that ended: the executor starts its stream threads afresh every
/// step, and pinning memory costs far more than the copies it serves.
static POOL: std::sync::Mutex<Vec<Staging>> = std::sync::Mutex::new(Vec::new());

/// This thread's staging buffer, handed back to [`POOL`] when the thread ends.
struct Slot(Option<Staging>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(st) = self.0.take() {
            POOL.lock().unwrap_or_else(|p| p.into_inner()).push(st);
        }
    }
}

/// Whether `MOELAB_PAGEABLE_DOWNLOADS=1` asks for the old pageable copies.
fn pageable_downloads() -> bool {
    static PAGEABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAGEABLE.get_or_init(|| std::env::var("MOELAB_PAGEABLE_DOWNLOADS").is_ok_and(|v| v == "1"))
}

thread_local! {
    static SLOT: RefCell<Slot> = const { RefCell::new(Slot(None)) };
}

/// Copies `dst.len()` values of `T` from device address `src` into `dst`, ordered on `stream`,
/// and waits for the stream: through this thread's pinned staging buffer when the copy is at
/// most [`PINNED_STAGING_MAX_BYTES`], else directly.
///
/// # Safety
/// `src` must hold at least `dst.len()` values of `T` on the stream's device, and the calling
/// thread must have the stream's context current.
pub unsafe fn download<T: DeviceRepr>(dst: &mut [T], src: u64, stream: &CudaStream) -> Result<(), GpuError> {
    let bytes = std::mem::size_of_val(dst);
    let sync = || stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"));
    if bytes == 0 {
        return sync();
    }
    if bytes > PINNED_STAGING_MAX_BYTES || pageable_downloads() {
        // SAFETY: the caller's contract; the copy completes before sync returns.
        unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
        return sync();
    }
    SLOT.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.0.is_none() {
            slot.0 = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        }
        if slot.0.as_ref().is_none_or(|st| st.bytes < bytes) {
            let grown = bytes.next_power_of_two().max(64 << 10);
            // SAFETY: a fresh page-locked allocation replaces the old one (dropped, so freed
            // once; no copy from it is pending: every use below waits for its stream).
            let ptr = unsafe { result::malloc_host(grown, cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(GpuError::driver("cuMemHostAlloc"))?;
            slot.0 = Some(Staging { ptr, bytes: grown });
        }
        let st = slot.0.as_ref().expect("set above");
        // SAFETY: the staging buffer holds at least `bytes`; the copy lands there before the
        // stream sync returns, then moves to `dst` (both `bytes` long, not overlapping).
        unsafe {
            let staged = std::slice::from_raw_parts_mut(st.ptr as *mut u8, bytes);
            result::memcpy_dtoh_async(staged, src, stream.cu_stream()).map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
            sync()?;
            std::ptr::copy_nonoverlapping(st.ptr as *const u8, dst.as_mut_ptr() as *mut u8, bytes);
        }
        Ok(())
    })
}
