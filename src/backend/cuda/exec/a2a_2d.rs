//! Tutel's 2D hierarchical all-to-all on NCCL: rows are stride-copied so that each local
//! peer g gets, node by node, the rows for every node's GPU g; an all-to-all within the node
//! moves them; a second stride copy groups what arrived by destination node; an all-to-all
//! among the same-local-index GPUs of every node delivers them. The result is exactly the
//! flat all-to-all's (member-major rows), as the cpu definition (`cpu::exec::all_to_all_2d`)
//! requires. Row maps are built on the host from the gathered counts; the copies are one
//! gather kernel each.

use super::{Arg, ExecError, StreamExec};
use crate::backend::cuda::store::Storage;
use crate::plan::{BufId, GroupId};

/// The geometry of one exchange: `counts[p]` rows of this rank go to flat member
/// `p = node * gpn + local`.
struct Geometry {
    gpn: usize,
    nodes: usize,
    me_local: usize,
}

impl StreamExec<'_> {
    /// `dst[r] = src[map[r]]` for rows of `row_len` elements of `st` (nothing when `map` is empty).
    fn gather_by_map(&self, src: u64, dst: u64, map: &[i32], row_len: usize, st: Storage) -> Result<(), ExecError> {
        if map.is_empty() {
            return Ok(());
        }
        let dev = self.scratch(map.len() * 4)?;
        // SAFETY: dev holds map.len() i32; the host memory is staged before this returns.
        unsafe { cudarc::driver::result::memcpy_htod_async(dev, map, self.cu()) }
            .map_err(moelab_kernels::error::GpuError::driver("cuMemcpyHtoDAsync"))?;
        self.launch_st("gather_rows", st, self.grid(map.len() * row_len), &[Arg::P(src), Arg::P(dev), Arg::P(dst), Arg::I64(map.len() as i64), Arg::I32(row_len as i32)])?;
        self.scratch_free(dev)?;
        Ok(())
    }

    /// [`crate::plan::OpKind::AllToAllV2d`]; returns the bytes this rank sent in both phases.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn all_to_all_2d(&self, intra: GroupId, inter: GroupId, send: BufId, send_counts: BufId, recv: BufId, row_len: usize, gpn: usize) -> Result<u64, ExecError> {
        let counts = self.download_i32(send_counts)?;
        let st = self.st(recv);
        let es = st.size();
        let sb = self.input_as(send, st)?;
        let g = Geometry { gpn, nodes: counts.len() / gpn.max(1), me_local: self.comms.index_in(intra)? };
        let me_node = self.comms.index_in(inter)?;
        let flat = |node: usize, local: usize| node * g.gpn + local;
        let mut offsets = Vec::with_capacity(counts.len());
        let mut off = 0i32;
        for &c in counts.iter() {
            offsets.push(off);
            off += c;
        }
        // Phase 0: group by destination local index, node-major within each.
        let mut map0 = Vec::new();
        for local in 0..g.gpn {
            for node in 0..g.nodes {
                let p = flat(node, local);
                map0.extend(offsets[p]..offsets[p] + counts[p]);
            }
        }
        // Every local source's counts: what arrives from it, node by node.
        let full = self.comms.all_gather_i32(intra, &counts, &self.s.stream)?;
        let m1: Vec<Vec<i32>> = full.iter().map(|c| (0..g.gpn).map(|local| (0..g.nodes).map(|n| c[flat(n, local)]).sum()).collect()).collect();
        let rows1: usize = m1.iter().map(|row| row[g.me_local] as usize).sum();
        let p0 = self.scratch(map0.len().max(1) * row_len * es)?;
        self.gather_by_map(sb.ptr, p0, &map0, row_len, st)?;
        self.done(sb)?;
        let p1 = self.scratch(rows1.max(1) * row_len * es)?;
        self.comms.all_to_all_v(intra, p0, p1, &m1, row_len, st, &self.s.stream)?;
        self.scratch_free(p0)?;
        // Phase 2: what came from local source s holds, node by node, full[s][flat(n, me)]
        // rows; regroup by destination node n, source-major within each.
        let mut starts = vec![vec![0i32; g.nodes]; full.len()];
        let mut at = 0i32;
        for (s, c) in full.iter().enumerate() {
            for n in 0..g.nodes {
                starts[s][n] = at;
                at += c[flat(n, g.me_local)];
            }
        }
        let mut map2 = Vec::new();
        let mut c2 = vec![0i32; g.nodes];
        for n in 0..g.nodes {
            for (s, c) in full.iter().enumerate() {
                let k = c[flat(n, g.me_local)];
                map2.extend(starts[s][n]..starts[s][n] + k);
                c2[n] += k;
            }
        }
        let p2 = self.scratch(map2.len().max(1) * row_len * es)?;
        self.gather_by_map(p1, p2, &map2, row_len, st)?;
        self.scratch_free(p1)?;
        let m2 = self.comms.exchange_counts(inter, &c2, &self.s.stream)?;
        let rows: usize = m2.iter().map(|row| row[me_node] as usize).sum();
        let rb = self.output(recv, rows * row_len)?;
        self.comms.all_to_all_v(inter, p2, rb.ptr, &m2, row_len, st, &self.s.stream)?;
        self.scratch_free(p2)?;
        Ok(((map0.len() + map2.len()) * row_len * es) as u64)
    }
}
