//! Device buffers of one rank: raw allocations from CUDA's stream-ordered pool (a caching
//! allocator: freed blocks go back to the pool, not to the driver), each tagged with the
//! plan's memory category, with the same live-byte ledger as the cpu backend so the real
//! per-category peak can be held against the plan's prediction.

use crate::backend::cpu::store::Data;
use crate::plan::{BufId, BufferDesc, ElemType};
use crate::trace::MemEvent;
use cudarc::driver::result;
use cudarc::driver::sys::CUstream;
use moelab_kernels::error::GpuError;
use std::sync::Arc;
use std::time::Instant;

/// How a value buffer is stored on the device: f32, or bf16 (a plan buffer with `elem ==
/// F32` and `elem_bytes == 2`, see [`crate::plan::precision`]). Index buffers count as f32
/// (4-byte elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// 4-byte elements (f32 values, or i32 indices).
    F32,
    /// bf16 values (raw 16 bits).
    Bf16,
}

impl Storage {
    /// The storage of a plan buffer.
    pub fn of(desc: &BufferDesc) -> Storage {
        if desc.is_bf16() {
            Storage::Bf16
        } else {
            Storage::F32
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }
}

/// One live device buffer.
#[derive(Debug, Clone, Copy)]
pub struct DevBuf {
    /// Device address.
    pub ptr: u64,
    /// Elements it holds now (the planned size for static buffers).
    pub len: usize,
    /// Streams (bit i = plan stream i) that used it since it was allocated.
    pub used_by: u8,
}

/// Buffers of one rank with live-byte accounting per memory category.
pub struct DevStore {
    descs: Vec<BufferDesc>,
    bufs: Vec<Option<DevBuf>>,
    held: Vec<u64>,
    in_use: [u64; 7],
    rank: u32,
    epoch: Instant,
    /// Memory events so far.
    pub events: Vec<MemEvent>,
    /// Highest total so far.
    pub peak_total: u64,
    /// Bytes per category when the total first reached `peak_total`.
    pub at_peak: [u64; 7],
    /// Per buffer, which rows hold routed data (the others are zero), where known: set for
    /// dropless expert buffers by the layout op that fills them and carried along the expert
    /// MLP, so its GEMMs run on each expert's real rows instead of the busiest expert's.
    fill: Vec<Option<Arc<Vec<bool>>>>,
    /// Per buffer, its contents on the host where known (downloaded or uploaded since it was
    /// last written): a routing table read by several ops is copied down once, and only the
    /// first reader waits for its stream to drain.
    host: Vec<Option<Arc<Data>>>,
    /// Per buffer, how often it was written or reallocated: a download that started before a
    /// write must not be kept as the host copy of what the write put there.
    version: Vec<u64>,
}

impl DevStore {
    /// An empty store for `rank`'s buffers.
    pub fn new(rank: u32, descs: Vec<BufferDesc>, epoch: Instant) -> Self {
        let n = descs.len();
        DevStore { descs, bufs: vec![None; n], held: vec![0; n], in_use: [0; 7], rank, epoch, events: Vec::new(), peak_total: 0, at_peak: [0; 7], fill: vec![None; n], host: vec![None; n], version: vec![0; n] }
    }

    /// The plan's description of a buffer.
    pub fn desc(&self, id: BufId) -> &BufferDesc {
        &self.descs[id.0 as usize]
    }

    /// The live buffer, if any.
    pub fn get(&self, id: BufId) -> Option<DevBuf> {
        self.bufs[id.0 as usize]
    }

    /// Marks a buffer as used by plan stream `s`.
    pub fn touch(&mut self, id: BufId, s: usize) {
        if let Some(b) = self.bufs[id.0 as usize].as_mut() {
            b.used_by |= 1 << s;
        }
    }

    fn account(&mut self, id: BufId, bytes: u64) {
        let i = id.0 as usize;
        let old = self.held[i];
        if old == bytes {
            return;
        }
        let cat = self.descs[i].category;
        self.held[i] = bytes;
        self.in_use[cat.index()] = self.in_use[cat.index()] + bytes - old;
        let total: u64 = self.in_use.iter().sum();
        if total > self.peak_total {
            self.peak_total = total;
            self.at_peak = self.in_use;
        }
        let t_ns = self.epoch.elapsed().as_nanos() as u64;
        self.events.push(MemEvent { rank: self.rank, t_ns, category: cat, delta: bytes as i64 - old as i64 });
    }

    /// Makes `id` hold `len` elements, zero-filled, on `stream` (the planned size for static
    /// buffers; `len` must not exceed it). An existing allocation of the right size is reused
    /// as is (its contents kept) when `keep` is set.
    // `stream` is an opaque CUDA handle passed to the driver, never dereferenced here.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn alloc(&mut self, id: BufId, len: usize, stream: CUstream, stream_index: usize, keep: bool) -> Result<DevBuf, GpuError> {
        self.alloc_with(id, len, stream, stream_index, keep, true)
    }

    /// [`DevStore::alloc`] without zeroing a new allocation: for outputs whose kernel writes
    /// every element, or whose caller zeroes what it does not write.
    pub fn alloc_unzeroed(&mut self, id: BufId, len: usize, stream: CUstream, stream_index: usize, keep: bool) -> Result<DevBuf, GpuError> {
        self.alloc_with(id, len, stream, stream_index, keep, false)
    }

    fn alloc_with(&mut self, id: BufId, len: usize, stream: CUstream, stream_index: usize, keep: bool, zero: bool) -> Result<DevBuf, GpuError> {
        let d = &self.descs[id.0 as usize];
        if len > d.elems {
            return Err(GpuError::Shape { op: "alloc", what: "elements beyond the plan", expected: d.elems, got: len });
        }
        let len = if d.dynamic { len } else { d.elems };
        let esize = match d.elem {
            ElemType::F32 | ElemType::I32 => Storage::of(d).size(),
        };
        let elem_bytes = d.elem_bytes;
        self.written(id);
        if let Some(b) = self.bufs[id.0 as usize] {
            if b.len == len && keep {
                self.touch(id, stream_index);
                return Ok(self.bufs[id.0 as usize].expect("live"));
            }
            self.release(id, stream)?;
        }
        let bytes = (len * esize).max(4);
        // SAFETY: the stream is live; the memory is zeroed (or written by the caller) before
        // any kernel reads it.
        let ptr = unsafe {
            let p = result::malloc_async(stream, bytes).map_err(GpuError::driver("cuMemAllocAsync"))?;
            if zero {
                result::memset_d8_async(p, 0, bytes, stream).map_err(GpuError::driver("cuMemsetD8Async"))?;
            }
            p
        };
        let b = DevBuf { ptr, len, used_by: 1 << stream_index };
        self.bufs[id.0 as usize] = Some(b);
        self.account(id, (len * elem_bytes) as u64);
        Ok(b)
    }

    /// Frees a buffer on `stream` (stream-ordered; the caller made `stream` wait for every
    /// other stream that used it).
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn release(&mut self, id: BufId, stream: CUstream) -> Result<(), GpuError> {
        self.written(id);
        if let Some(b) = self.bufs[id.0 as usize].take() {
            // SAFETY: allocated by malloc_async and freed once (taken out of the map).
            unsafe { result::free_async(b.ptr, stream) }.map_err(GpuError::driver("cuMemFreeAsync"))?;
            self.account(id, 0);
        }
        Ok(())
    }

    /// Records which rows of `id` (as last allocated) hold data; every other row is zero.
    pub fn set_fill(&mut self, id: BufId, rows: Arc<Vec<bool>>) {
        self.fill[id.0 as usize] = Some(rows);
    }

    /// Forgets what is known of `id`'s contents (its filled rows, its host copy): an op is
    /// about to write it, or it is reallocated or freed.
    pub fn written(&mut self, id: BufId) {
        let i = id.0 as usize;
        self.fill[i] = None;
        self.host[i] = None;
        self.version[i] += 1;
    }

    /// How often `id` was written so far (see [`DevStore::keep_host_copy`]).
    pub fn version(&self, id: BufId) -> u64 {
        self.version[id.0 as usize]
    }

    /// The host copy of `id`'s contents, if one was kept since its last write.
    pub fn host_copy(&self, id: BufId) -> Option<Arc<Data>> {
        self.host[id.0 as usize].clone()
    }

    /// Keeps `data` as the host copy of `id`, which held it at `version` (nothing is kept
    /// when the buffer was written since).
    pub fn keep_host_copy(&mut self, id: BufId, version: u64, data: Arc<Data>) {
        let i = id.0 as usize;
        if self.version[i] == version && self.bufs[i].is_some() {
            self.host[i] = Some(data);
        }
    }

    /// The rows of `id` that hold data, if recorded since its last allocation.
    pub fn fill(&self, id: BufId) -> Option<Arc<Vec<bool>>> {
        self.fill[id.0 as usize].clone()
    }

    /// Bytes per category in use now.
    pub fn in_use(&self) -> [u64; 7] {
        self.in_use
    }
}
