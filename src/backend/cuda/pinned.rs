//! Device-to-host copies through page-locked staging memory, one staging buffer per host
//! thread. A copy into pageable memory holds up every other thread's pageable download in the
//! driver until it completes: `moelab calibrate`'s host-copy probe (H200, 2026-11-24) timed a
//! 4 KiB pageable download on an idle stream at 4.1 ms while another thread's download waited
//! behind queued GEMMs (25 us alone), a pinned one at 24 us. The cuda executor's stream threads
//! download routing tables and counts while the comm thread waits in count exchanges, so their
//! small downloads go through here. `MOELAB_PAGEABLE_DOWNLOADS=1` restores pageable copies
//! (for A/B runs).

use cudarc::driver::{result, CudaStream, DeviceRepr};
use moelab_kernels::error::GpuError;
use std::cell::RefCell;
use std::ffi::c_void;

/// Largest copy staged (bytes); larger ones (whole activations for a cross-check) go straight
/// to pageable memory rather than pinning that much host memory per thread.
pub const PINNED_STAGING_MAX_BYTES: usize = 64 << 20;

/// A thread's page-locked staging buffer, grown on demand, freed with the thread.
struct Staging {
    ptr: *mut c_void,
    bytes: usize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by malloc_host and freed once; a failure (the context already
            // gone at process exit) leaves nothing to do.
            let _ = unsafe { result::free_host(self.ptr) };
        }
    }
}

/// Whether `MOELAB_PAGEABLE_DOWNLOADS=1` asks for the old pageable copies.
fn pageable_downloads() -> bool {
    static PAGEABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAGEABLE.get_or_init(|| std::env::var("MOELAB_PAGEABLE_DOWNLOADS").is_ok_and(|v| v == "1"))
}

thread_local! {
    static STAGING: RefCell<Staging> = const { RefCell::new(Staging { ptr: std::ptr::null_mut(), bytes: 0 }) };
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
        return Ok(());
    }
    if bytes > PINNED_STAGING_MAX_BYTES || pageable_downloads() {
        // SAFETY: the caller's contract; the copy completes before sync returns.
        unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
        return sync();
    }
    STAGING.with(|cell| {
        let mut st = cell.borrow_mut();
        if st.bytes < bytes {
            let grown = bytes.next_power_of_two().max(64 << 10);
            // SAFETY: a fresh page-locked allocation replaces the old one (freed once, no copy
            // from it is pending: every use below waits for its stream).
            let ptr = unsafe { result::malloc_host(grown, cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(GpuError::driver("cuMemHostAlloc"))?;
            *st = Staging { ptr, bytes: grown };
        }
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
