//! Megatron-style tensor parallelism of the dense backbone (no sequence parallelism): a
//! column-parallel projection keeps `1/tp` of the output columns of every block of its
//! weight (attention's q, k and v blocks, split by heads; the MLP's fc1), a row-parallel one
//! keeps `1/tp` of the input rows (attention's output projection, the MLP's fc2) and yields a
//! partial sum that an all-reduce over the TP group completes. The row-parallel bias and the
//! residual are added by TP index 0 only, so the all-reduced sum counts them once.

use super::blocks::linear;
use crate::math::linalg::gemm_flops;
use crate::plan::{BufId, GroupId, OpKind, ParamInit, ParamSlice, RankBuilder};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// This rank's place in its tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShard {
    /// Index in the group.
    pub index: usize,
    /// Group size (> 1).
    pub size: usize,
    /// The group (consecutive ranks holding the same tokens).
    pub group: GroupId,
}

fn init(tag: &str, layer: usize, std: f32) -> ParamInit {
    ParamInit { tag: tag.into(), layer: layer as u32, experts: None, mean: 0.0, std }
}

/// A column-parallel projection `y[rows, d_out/tp] = x W[:, cols] + b[cols]`, where the
/// drawn weight `[d_in, d_out]` is `blocks` equal column blocks (q, k, v) and this rank keeps
/// its `1/tp` of each block, blocks side by side. Without `tp`, the whole projection.
/// Returns (y, w, bias).
#[allow(clippy::too_many_arguments)]
pub fn column_linear(b: &mut RankBuilder, name: &str, tag: &str, stage: Stage, layer: usize, x: BufId, rows: usize, d_in: usize,
    d_out: usize, blocks: usize, tp: Option<&TpShard>) -> (BufId, BufId, Option<BufId>) {
    let Some(tp) = tp else {
        return linear(b, name, tag, stage, layer, x, None, rows, d_in, d_out, true);
    };
    let block = d_out / blocks;
    let keep = (tp.index * block / tp.size, (tp.index + 1) * block / tp.size);
    let local = d_out / tp.size;
    let w = b.param_sliced(&format!("L{layer}.{tag}.w"), d_in * local, init(&format!("{tag}.w"), layer, 1.0 / (d_in as f32).sqrt()), false,
        ParamSlice { rows: d_in * blocks, cols: block, keep });
    let bias = b.param_sliced(&format!("L{layer}.{tag}.b"), local, init(&format!("{tag}.b"), layer, 0.02), false,
        ParamSlice { rows: blocks, cols: block, keep });
    let y = b.buf(format!("L{layer}.{tag}.y"), rows * local, Mc::Activations);
    let bytes = 4 * (rows * d_in + d_in * local + rows * local) as u64;
    b.op(name, stage, Pass::Forward, OpKind::Linear { x, w, bias: Some(bias), residual: None, y, rows, d_in, d_out: local },
        gemm_flops(rows, d_in, local), bytes);
    (y, w, Some(bias))
}

/// A row-parallel projection with its residual: `out = residual + x W + b`, where this rank
/// holds `x[rows, d_in/tp]` and rows `[i d_in/tp, (i+1) d_in/tp)` of the drawn `[d_in, d_out]`
/// weight; TP index 0 adds the bias and the residual, and an all-reduce over the TP group
/// (named `{name}_allreduce`) sums the partial outputs. Without `tp`, the whole projection.
/// Returns (out, w, bias); the bias exists on TP index 0 only.
#[allow(clippy::too_many_arguments)]
pub fn row_linear(b: &mut RankBuilder, name: &str, tag: &str, stage: Stage, layer: usize, x: BufId, residual: BufId, rows: usize,
    d_in: usize, d_out: usize, tp: Option<&TpShard>) -> (BufId, BufId, Option<BufId>) {
    let Some(tp) = tp else {
        return linear(b, name, tag, stage, layer, x, Some(residual), rows, d_in, d_out, true);
    };
    let local = d_in / tp.size;
    let keep = (tp.index * local * d_out, (tp.index + 1) * local * d_out);
    let w = b.param_sliced(&format!("L{layer}.{tag}.w"), local * d_out, init(&format!("{tag}.w"), layer, 1.0 / (d_in as f32).sqrt()), false,
        ParamSlice { rows: 1, cols: d_in * d_out, keep });
    let first = tp.index == 0;
    let bias = first.then(|| b.param(&format!("L{layer}.{tag}.b"), d_out, init(&format!("{tag}.b"), layer, 0.02), false));
    let y = b.buf(format!("L{layer}.{tag}.y"), rows * d_out, Mc::Activations);
    let bytes = 4 * (rows * local + local * d_out + rows * d_out) as u64;
    b.op(name, stage, Pass::Forward,
        OpKind::Linear { x, w, bias, residual: first.then_some(residual), y, rows, d_in: local, d_out }, gemm_flops(rows, local, d_out), bytes);
    allreduce(b, &format!("{name}_allreduce"), Pass::Forward, tp, y);
    (y, w, bias)
}

/// Sum `buf` over the TP group in place (the partial output of a row-parallel projection, or
/// the partial input gradient of a column-parallel one).
pub fn allreduce(b: &mut RankBuilder, name: &str, pass: Pass, tp: &TpShard, buf: BufId) {
    let bytes = b.f32_bytes_of(buf);
    b.op(name, Stage::AllReduce, pass, OpKind::AllReduce { group: tp.group, bufs: vec![buf] }, 0, bytes);
}
