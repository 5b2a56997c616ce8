//! NCCL communicators for the plan's process groups, and the collectives the plans use.
//!
//! One world communicator is created from the unique id the launcher hands every worker;
//! each group of the plan is then split from it (every rank calls `ncclCommSplit` for every
//! group, in plan order, with its own colour only where it is a member). Groups of one rank
//! need no NCCL: their collectives are copies. A communicator is used by one host thread at
//! a time (a mutex per group), as NCCL requires.

use super::store::Storage;
use crate::plan::{Group, GroupId};
use cudarc::driver::{result, CudaStream};
use cudarc::nccl::sys::{self as nccl, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use moelab_kernels::error::GpuError;
use std::sync::Mutex;

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// An NCCL call returned an error.
    #[error("NCCL {call} failed: {message}")]
    Nccl {
        /// The call.
        call: &'static str,
        /// NCCL's error.
        message: String,
    },
    /// This rank is not in the group (a plan bug).
    #[error("rank is not a member of group {0}")]
    NotMember(u32),
    /// A CUDA call around the collective failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// NCCL's element type for a buffer storage.
fn nccl_type(st: Storage) -> ncclDataType_t {
    match st {
        Storage::F32 => ncclDataType_t::ncclFloat32,
        Storage::Bf16 => ncclDataType_t::ncclBfloat16,
    }
}

struct Member {
    comm: Option<ncclComm_t>,
    size: usize,
    index: usize,
}

// SAFETY: an NCCL communicator may move between threads; the mutex around each Member keeps
// calls on one communicator from overlapping.
unsafe impl Send for Member {}

/// The rank's communicators, one per group it belongs to.
pub struct Comms {
    groups: Vec<Option<Mutex<Member>>>,
    world: Option<ncclComm_t>,
}

// SAFETY: see Member; the world communicator is only used during construction and drop.
unsafe impl Send for Comms {}
unsafe impl Sync for Comms {}

fn check(call: &'static str, r: nccl::ncclResult_t) -> Result<(), CommError> {
    if r == nccl::ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        // SAFETY: ncclGetErrorString returns a static C string for any result code.
        let msg = unsafe { std::ffi::CStr::from_ptr(nccl::ncclGetErrorString(r)) }.to_string_lossy().into_owned();
        Err(CommError::Nccl { call, message: format!("{msg} ({r:?})") })
    }
}

/// A fresh NCCL unique id (the launcher makes one per job), as hex for the environment.
pub fn new_unique_id_hex() -> Result<String, CommError> {
    // Without libnccl cudarc's loader panics: say so instead.
    moelab_kernels::device::require_nccl().map_err(|e| CommError::Nccl { call: "ncclGetUniqueId", message: e.to_string() })?;
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| CommError::Nccl { call: "ncclGetUniqueId", message: format!("{e:?}") })?;
    Ok(id.internal.iter().map(|b| format!("{:02x}", *b as u8)).collect())
}

/// Parses [`new_unique_id_hex`]'s output.
pub fn parse_unique_id(hex: &str) -> Option<ncclUniqueId> {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect::<Option<_>>()?;
    let mut id = ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return None;
    }
    for (d, b) in id.internal.iter_mut().zip(bytes) {
        *d = b as _;
    }
    Some(id)
}

impl Comms {
    /// Communicators for `rank` of `world` (`id` is required when world > 1).
    pub fn new(rank: u32, world: usize, id: Option<ncclUniqueId>, groups: &[Group]) -> Result<Comms, CommError> {
        let mut world_comm = None;
        if world > 1 {
            let id = id.ok_or(CommError::Nccl { call: "ncclCommInitRank", message: "no unique id (MOELAB_NCCL_ID) for a multi-rank job".into() })?;
            let mut comm: ncclComm_t = std::ptr::null_mut();
            // SAFETY: comm is a valid out-pointer; every rank calls with the same id.
            check("ncclCommInitRank", unsafe { nccl::ncclCommInitRank(&mut comm, world as i32, id, rank as i32) })?;
            world_comm = Some(comm);
        }
        let mut out = Vec::with_capacity(groups.len());
        for (gi, g) in groups.iter().enumerate() {
            let index = g.ranks.iter().position(|&r| r == rank);
            let member = match (world_comm, g.ranks.len()) {
                (Some(wc), n) if n > 1 => {
                    // Every rank takes part in every split; non-members pass NCCL_SPLIT_NOCOLOR.
                    let color = if index.is_some() { gi as i32 } else { -1 };
                    let mut comm: ncclComm_t = std::ptr::null_mut();
                    // SAFETY: wc is live; comm is a valid out-pointer; a null config is allowed.
                    check("ncclCommSplit", unsafe { nccl::ncclCommSplit(wc, color, index.unwrap_or(0) as i32, &mut comm, std::ptr::null_mut()) })?;
                    index.map(|i| Member { comm: Some(comm), size: n, index: i })
                }
                (_, n) => index.map(|i| Member { comm: None, size: n, index: i }),
            };
            out.push(member.map(Mutex::new));
        }
        Ok(Comms { groups: out, world: world_comm })
    }

    fn member(&self, g: GroupId) -> Result<std::sync::MutexGuard<'_, Member>, CommError> {
        self.groups
            .get(g.0 as usize)
            .and_then(|m| m.as_ref())
            .ok_or(CommError::NotMember(g.0))
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// This rank's position in group `g`.
    pub fn index_in(&self, g: GroupId) -> Result<usize, CommError> {
        Ok(self.member(g)?.index)
    }

    fn copy(dst: u64, src: u64, elems: usize, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        if elems > 0 && dst != src {
            // SAFETY: both hold `elems` elements of `st` on this device.
            unsafe { result::memcpy_dtod_async(dst, src, elems * st.size(), s.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))?;
        }
        Ok(())
    }

    /// In-place sum over the group (elements of storage `st`; bf16 sums in bf16, as NCCL does).
    pub fn all_reduce(&self, g: GroupId, buf: u64, elems: usize, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        let m = self.member(g)?;
        match m.comm {
            None => Ok(()),
            // SAFETY: buf holds elems of st; the stream belongs to this communicator's device.
            Some(c) => check("ncclAllReduce", unsafe {
                nccl::ncclAllReduce(buf as _, buf as _, elems, nccl_type(st), ncclRedOp_t::ncclSum, c, s.cu_stream() as _)
            }),
        }
    }

    /// `recv[size * elems]` = every member's `send[elems]`, in group order.
    pub fn all_gather(&self, g: GroupId, send: u64, recv: u64, elems: usize, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        let m = self.member(g)?;
        match m.comm {
            None => Self::copy(recv, send, elems, st, s),
            // SAFETY: send holds elems, recv size * elems elements of st.
            Some(c) => check("ncclAllGather", unsafe {
                nccl::ncclAllGather(send as _, recv as _, elems, nccl_type(st), c, s.cu_stream() as _)
            }),
        }
    }

    /// `recv[elems]` = the sum over members of their part `i` of `send[size * elems]`.
    pub fn reduce_scatter(&self, g: GroupId, send: u64, recv: u64, elems: usize, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        let m = self.member(g)?;
        match m.comm {
            None => Self::copy(recv, send, elems, st, s),
            // SAFETY: send holds size * elems, recv elems elements of st.
            Some(c) => check("ncclReduceScatter", unsafe {
                nccl::ncclReduceScatter(send as _, recv as _, elems, nccl_type(st), ncclRedOp_t::ncclSum, c, s.cu_stream() as _)
            }),
        }
    }

    /// Every member's `counts` (one per member): row p of the result is member p's.
    pub fn exchange_counts(&self, g: GroupId, counts: &[i32], s: &CudaStream) -> Result<Vec<Vec<i32>>, CommError> {
        self.all_gather_i32(g, counts, s)
    }

    /// Every member's `vals` (the same length on every member), gathered to the host: row p
    /// of the result is member p's. Synchronises the stream.
    pub fn all_gather_i32(&self, g: GroupId, vals: &[i32], s: &CudaStream) -> Result<Vec<Vec<i32>>, CommError> {
        let m = self.member(g)?;
        let n = m.size;
        let len = vals.len();
        let Some(c) = m.comm else {
            return Ok(vec![vals.to_vec()]);
        };
        let cu = s.cu_stream();
        // SAFETY: scratch buffers sized for len and n * len i32, freed below on the same
        // stream after the synchronising copy back.
        unsafe {
            let send = result::malloc_async(cu, len.max(1) * 4).map_err(GpuError::driver("cuMemAllocAsync"))?;
            let recv = result::malloc_async(cu, (n * len).max(1) * 4).map_err(GpuError::driver("cuMemAllocAsync"))?;
            result::memcpy_htod_async(send, vals, cu).map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
            check("ncclAllGather", nccl::ncclAllGather(send as _, recv as _, len, ncclDataType_t::ncclInt32, c, cu as _))?;
            let mut all = vec![0i32; n * len];
            super::pinned::download(&mut all, recv, s)?;
            result::free_async(send, cu).map_err(GpuError::driver("cuMemFreeAsync"))?;
            result::free_async(recv, cu).map_err(GpuError::driver("cuMemFreeAsync"))?;
            Ok(all.chunks(len.max(1)).map(<[i32]>::to_vec).collect())
        }
    }

    /// Variable all-to-all: to member p, `matrix[me][p] * row_len` elements (of storage
    /// `st`) from `send` (peer-major); from member p, `matrix[p][me] * row_len` into `recv`
    /// (peer-major).
    #[allow(clippy::too_many_arguments)]
    pub fn all_to_all_v(&self, g: GroupId, send: u64, recv: u64, matrix: &[Vec<i32>], row_len: usize, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        let m = self.member(g)?;
        let me = m.index;
        let Some(c) = m.comm else {
            return Self::copy(recv, send, matrix[0][0] as usize * row_len, st, s);
        };
        let (dt, es) = (nccl_type(st), st.size() as u64);
        let cu = s.cu_stream();
        check("ncclGroupStart", unsafe { nccl::ncclGroupStart() })?;
        let (mut soff, mut roff) = (0usize, 0usize);
        #[allow(clippy::needless_range_loop)] // peer indexes both matrix axes
        for peer in 0..m.size {
            let sn = matrix[me][peer] as usize * row_len;
            let rn = matrix[peer][me] as usize * row_len;
            // SAFETY: offsets stay inside send (sum of my counts) and recv (sum of counts to
            // me), sized by the caller from the same matrix.
            unsafe {
                if sn > 0 {
                    check("ncclSend", nccl::ncclSend((send + soff as u64 * es) as _, sn, dt, peer as i32, c, cu as _))?;
                }
                if rn > 0 {
                    check("ncclRecv", nccl::ncclRecv((recv + roff as u64 * es) as _, rn, dt, peer as i32, c, cu as _))?;
                }
            }
            soff += sn;
            roff += rn;
        }
        check("ncclGroupEnd", unsafe { nccl::ncclGroupEnd() })
    }

    /// Point-to-point exchange with the other member of a 2-member group, in one NCCL group
    /// call: `send` (address, elements of storage `st`) goes to it, `recv` gets what it sends.
    pub fn send_recv(&self, g: GroupId, send: Option<(u64, usize)>, recv: Option<(u64, usize)>, st: Storage, s: &CudaStream) -> Result<(), CommError> {
        let m = self.member(g)?;
        let Some(c) = m.comm else {
            // A group of one: what it sends is what it receives.
            return match (send, recv) {
                (Some((sp, n)), Some((rp, _))) => Self::copy(rp, sp, n, st, s),
                _ => Ok(()),
            };
        };
        if m.size != 2 {
            return Err(CommError::Nccl { call: "send_recv", message: format!("group {} has {} members, a pipeline exchange needs 2", g.0, m.size) });
        }
        let peer = (1 - m.index) as i32;
        let cu = s.cu_stream();
        check("ncclGroupStart", unsafe { nccl::ncclGroupStart() })?;
        let dt = nccl_type(st);
        // SAFETY: the caller's buffers hold the given element counts of `st` on this device;
        // both calls are issued inside one group, so their order between the peers does not matter.
        unsafe {
            if let Some((ptr, n)) = send.filter(|x| x.1 > 0) {
                check("ncclSend", nccl::ncclSend(ptr as _, n, dt, peer, c, cu as _))?;
            }
            if let Some((ptr, n)) = recv.filter(|x| x.1 > 0) {
                check("ncclRecv", nccl::ncclRecv(ptr as _, n, dt, peer, c, cu as _))?;
            }
        }
        check("ncclGroupEnd", unsafe { nccl::ncclGroupEnd() })
    }

    /// Aborts every communicator (a peer died): pending NCCL calls return.
    pub fn abort(&self) {
        for m in self.groups.iter().flatten() {
            if let Ok(m) = m.try_lock() {
                if let Some(c) = m.comm {
                    // SAFETY: c is live; abort may be called from any thread.
                    unsafe { nccl::ncclCommAbort(c) };
                }
            }
        }
    }
}

impl Drop for Comms {
    fn drop(&mut self) {
        for m in self.groups.iter().flatten() {
            let m = m.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = m.comm {
                // SAFETY: c is live and destroyed once.
                unsafe { nccl::ncclCommDestroy(c) };
            }
        }
        if let Some(w) = self.world {
            // SAFETY: as above.
            unsafe { nccl::ncclCommDestroy(w) };
        }
    }
}
