//! The bf16 precision policy, applied once to every finished rank plan whose transient
//! buffers were built 2 bytes wide (`model.dtype = "bf16"`).
//!
//! Rule: a transient value buffer (`ElemType::F32`) is stored bf16 (`elem_bytes == 2`) unless
//! an op reads or writes it in a precision-sensitive role, decided by op kind: routing
//! (`Route`'s logits, which is also the gate GEMM's output, probs, weights and stats;
//! `RouteBwd`'s dweights and dlogits; every routing table `gathered` and what all-gathers
//! into it), LayerNorm statistics, the loss and its target (`Loss` / `LossReplica`; the loss
//! gradient `dy` is a bf16 activation gradient), the combine weights and their gradients, biases and LayerNorm gains read as operands,
//! every weight gradient (the `dw` / `dbias` / `dgamma` / `dbeta` outputs and what
//! `GradAccum` and `ReduceScatter` move), and an all-gathered copy of a parameter that no GEMM
//! reads as its weight: those stay f32 (`elem_bytes == 4`). A Linear whose output stays f32
//! (the router's gate) runs in f32 forward and backward on its f32 master weight, as Megatron
//! keeps the router in fp32: bf16 gate gradients lose the small differences the softmax
//! backward leaves. Parameters, gradients and Adam
//! moments are persistent f32 masters; each parameter a GEMM reads as its weight (directly, or
//! through an all-gather into the GEMM's weight operand) gets a persistent bf16 shadow
//! ([`ParamDesc::half`], category Params) that the executor fills at initialisation and Adam
//! rewrites in the same pass. Backends treat `elem == F32 && elem_bytes == 2` as bf16 storage.

use super::{BufId, BufferDesc, ElemType, Op, OpKind, ParamDesc};
use crate::taxonomy::MemCategory;
use std::collections::HashSet;

/// Whether a buffer is stored as bf16 (a value buffer two bytes wide).
pub fn is_bf16(desc: &BufferDesc) -> bool {
    desc.elem == ElemType::F32 && desc.elem_bytes == 2
}

/// Buffers that must stay f32 in a bf16 plan, by the role their ops give them.
fn sensitive(ops: &[Op]) -> HashSet<BufId> {
    use OpKind::*;
    let mut keep = HashSet::new();
    let mut add = |ids: &[BufId]| keep.extend(ids.iter().copied());
    for op in ops {
        match &op.kind {
            LoadBatch { target, .. } => add(&[*target]),
            LayerNorm { gamma, beta, stats, .. } => add(&[*gamma, *beta, *stats]),
            LayerNormBwd { gamma, stats, dgamma, dbeta, .. } => add(&[*gamma, *stats, *dgamma, *dbeta]),
            Linear { bias, .. } | ExpertLinearPart { bias, .. } => add(&bias.iter().copied().collect::<Vec<_>>()),
            ExpertLinear { bias, .. } => add(&[*bias]),
            LinearBwd { dw, dbias, .. } | ExpertLinearPartBwd { dw, dbias, .. } => {
                add(&[*dw]);
                add(&dbias.iter().copied().collect::<Vec<_>>());
            }
            ExpertLinearBwd { dw, dbias, .. } | ExpertLinearBwdAcc { dw, dbias, .. } => add(&[*dw, *dbias]),
            Route { logits, probs, weights, stats, .. } => add(&[*logits, *probs, *weights, *stats]),
            RouteBwd { probs, dweights, gathered, dlogits, .. } => add(&[*probs, *dweights, *gathered, *dlogits]),
            Combine { weights, .. } | CombinePart { weights, .. } => add(&[*weights]),
            CombineBwd { weights, dweights, .. } => add(&[*weights, *dweights]),
            // The loss and its target stay f32; its gradient `dy` enters the bf16 backward like
            // every activation gradient (Megatron: fp32 loss, bf16 grads), so both backends
            // round it once, where it is stored.
            Loss { target, loss, .. } | LossReplica { target, loss, .. } => add(&[*target, *loss]),
            Dispatch { gathered, .. }
            | ExpertLayout { gathered, .. }
            | ExpertUnlayout { gathered, .. }
            | ChunkSlice { gathered, .. }
            | ChunkMerge { gathered, .. }
            | ChunkLayout { gathered, .. }
            | ChunkUnlayout { gathered, .. }
            | TpLayout { gathered, .. }
            | TpUnlayout { gathered, .. }
            | TpMerge { gathered, .. }
            | LocalLayout { gathered, .. }
            | LocalUnlayout { gathered, .. }
            | ShardDispatch { gathered, .. }
            | ShardCounts { gathered, .. }
            | ShardCombine { gathered, .. } => add(&[*gathered]),
            GradAccum { pairs } => add(&pairs.iter().flat_map(|(s, d)| [*s, *d]).collect::<Vec<_>>()),
            ReduceScatter { send, recv, .. } => add(&[*send, *recv]),
            _ => {}
        }
    }
    // What feeds a kept buffer through an all-gather is kept too (e.g. routing stats).
    for op in ops {
        if let AllGather { send, recv, .. } = &op.kind {
            if keep.contains(recv) {
                keep.insert(*send);
            }
        }
    }
    keep
}

/// Buffers a GEMM reads as its weight operand.
fn gemm_weights(ops: &[Op], keep: &HashSet<BufId>) -> HashSet<BufId> {
    use OpKind::*;
    ops.iter()
        .filter_map(|op| match &op.kind {
            // A Linear whose output stays f32 (the router's logits) and its backward (an f32
            // dlogits) run in f32 on the master weight: no bf16 copy for them.
            Linear { y, .. } if keep.contains(y) => None,
            LinearBwd { dy, .. } if keep.contains(dy) => None,
            Linear { w, .. }
            | LinearBwd { w, .. }
            | ExpertLinear { w, .. }
            | ExpertLinearBwd { w, .. }
            | ExpertLinearBwdAcc { w, .. }
            | ExpertLinearPart { w, .. }
            | ExpertLinearPartBwd { w, .. } => Some(*w),
            _ => None,
        })
        .collect()
}

/// Applies the bf16 policy to a finished rank plan (its transient value buffers built 2 bytes
/// wide): sensitive buffers go back to f32, and each GEMM-read parameter gets its bf16 shadow
/// (appended to `buffers` as `<name>.bf16`).
pub fn apply_bf16(buffers: &mut Vec<BufferDesc>, ops: &[Op], params: &mut [ParamDesc]) {
    let keep = sensitive(ops);
    let weights = gemm_weights(ops, &keep);
    let param_values: HashSet<BufId> = params.iter().map(|p| p.value).collect();
    // Parameters all-gathered into buffers: into a GEMM's weight operand (bf16, sent from the
    // shadow) or into anything else (an f32 copy, e.g. gathered biases).
    let mut shadowed: HashSet<BufId> = weights.iter().copied().filter(|w| param_values.contains(w)).collect();
    let mut f32_copies = HashSet::new();
    for op in ops {
        if let OpKind::AllGather { send, recv, .. } = &op.kind {
            if param_values.contains(send) {
                if weights.contains(recv) && !keep.contains(recv) {
                    shadowed.insert(*send);
                } else {
                    f32_copies.insert(*recv);
                }
            }
        }
    }
    for (i, b) in buffers.iter_mut().enumerate() {
        let id = BufId(i as u32);
        if b.elem == ElemType::F32 && !b.persistent && (keep.contains(&id) || f32_copies.contains(&id)) {
            b.elem_bytes = 4;
        }
    }
    for p in params.iter_mut() {
        if !shadowed.contains(&p.value) {
            continue;
        }
        let master = &buffers[p.value.0 as usize];
        let shadow = BufferDesc {
            name: format!("{}.bf16", master.name),
            elems: master.elems,
            elem: ElemType::F32,
            elem_bytes: 2,
            category: MemCategory::Params,
            persistent: true,
            dynamic: false,
        };
        buffers.push(shadow);
        p.half = Some(BufId(buffers.len() as u32 - 1));
    }
}

/// Rescales every op's byte count from 4 bytes per element (the unit builders count in, see
/// [`super::graph::RankBuilder::f32_bytes_of`]) to the widths its buffers are stored at once
/// the policy ran: the count times the stored bytes of the buffers the op touches over their
/// bytes at 4 per element. A parameter a GEMM reads counts at its bf16 shadow's width (the
/// executors read the shadow); the optimizer reads the f32 masters. So the sim prices a bf16
/// plan's activation, LayerNorm or all-to-all at the bytes the GPU moves.
pub fn rescale_op_bytes(ops: &mut [Op], buffers: &[BufferDesc], params: &[ParamDesc]) {
    let shadow: std::collections::HashMap<BufId, BufId> = params.iter().filter_map(|p| p.half.map(|h| (p.value, h))).collect();
    for op in ops {
        let mut ids: Vec<BufId> = op.reads.iter().chain(&op.writes).copied().collect();
        ids.sort();
        ids.dedup();
        let (mut wide, mut stored) = (0u128, 0u128);
        for id in ids {
            let b = &buffers[id.0 as usize];
            let width = match shadow.get(&id) {
                Some(h) if op.stage != crate::taxonomy::Stage::Optimizer => buffers[h.0 as usize].elem_bytes,
                _ => b.elem_bytes,
            };
            wide += 4 * b.elems as u128;
            stored += (width * b.elems) as u128;
        }
        if wide > 0 && stored != wide {
            op.bytes = (op.bytes as u128 * stored / wide) as u64;
        }
    }
}
