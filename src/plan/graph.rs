//! [`RankBuilder`]: accumulates buffers, params and ops for one rank, derives each op's
//! reads/writes and dependencies from its [`OpKind`], and computes buffer lifetimes.

use super::{BufId, BufferDesc, ElemType, Op, OpId, OpKind, ParamDesc, ParamInit, ParamSlice, RankPlan};
use crate::taxonomy::{MemCategory, Pass, Stage, Stream};

/// Builds one [`RankPlan`].
#[derive(Debug)]
pub struct RankBuilder {
    rank: u32,
    buffers: Vec<BufferDesc>,
    ops: Vec<Op>,
    params: Vec<ParamDesc>,
    last_writer: Vec<Option<OpId>>,
    training: bool,
    elem_bytes: usize,
    layer: Option<u32>,
    chunk: Option<u32>,
    prefix: String,
    /// While set: `grad` hands out per-micro-batch gradient buffers (param value -> temporary).
    redirect: Option<Vec<(BufId, BufId)>>,
    recompute: bool,
}

impl RankBuilder {
    /// Start a rank; `training` adds grads and optimizer state to params.
    pub fn new(rank: u32, training: bool, elem_bytes: usize) -> Self {
        RankBuilder {
            rank,
            buffers: Vec::new(),
            ops: Vec::new(),
            params: Vec::new(),
            last_writer: Vec::new(),
            training,
            elem_bytes,
            layer: None,
            chunk: None,
            prefix: String::new(),
            redirect: None,
            recompute: false,
        }
    }
    /// Ops added next belong to this layer.
    pub fn set_layer(&mut self, layer: Option<u32>) {
        self.layer = layer;
    }
    /// Ops added next belong to this chunk.
    pub fn set_chunk(&mut self, chunk: Option<u32>) {
        self.chunk = chunk;
    }
    /// Transient buffers added next get this name prefix (e.g. `mb1.` for a micro-batch);
    /// parameters keep their names.
    pub fn set_buf_prefix(&mut self, prefix: impl Into<String>) {
        self.prefix = prefix.into();
    }
    /// From now on [`RankBuilder::grad`] returns a fresh transient gradient buffer per
    /// parameter (a micro-batch's gradients, to be added into the step's afterwards).
    pub fn begin_grad_redirect(&mut self) {
        self.redirect = Some(Vec::new());
    }
    /// The (temporary, step gradient) pairs handed out since the last call, while gradients
    /// stay redirected (empty when they are not).
    pub fn take_grad_redirect(&mut self) -> Vec<(BufId, BufId)> {
        let pairs = self.redirect.as_mut().map(std::mem::take).unwrap_or_default();
        pairs.into_iter().map(|(value, tmp)| (tmp, self.main_grad(value))).collect()
    }
    /// Stop redirecting gradients; returns the pairs handed out since the last take.
    pub fn end_grad_redirect(&mut self) -> Vec<(BufId, BufId)> {
        let pairs = self.take_grad_redirect();
        self.redirect = None;
        pairs
    }
    /// Ops added next recompute forward work inside the backward pass (activation
    /// checkpointing): ops built as [`Pass::Forward`] are recorded as [`Pass::Backward`] with
    /// their names prefixed `recompute.`, and new buffers are named `recompute.<name>` (so
    /// that name lookups keep finding the forward's buffers).
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }
    fn push_buf(&mut self, mut desc: BufferDesc) -> BufId {
        if self.recompute {
            debug_assert!(!desc.persistent, "recomputation creates no parameters");
            desc.name = format!("recompute.{}", desc.name);
        }
        if !desc.persistent && !self.prefix.is_empty() {
            desc.name = format!("{}{}", self.prefix, desc.name);
        }
        self.buffers.push(desc);
        self.last_writer.push(None);
        BufId(self.buffers.len() as u32 - 1)
    }
    /// A transient f32 buffer of `elems` elements.
    pub fn buf(&mut self, name: impl Into<String>, elems: usize, category: MemCategory) -> BufId {
        let elem_bytes = self.elem_bytes;
        self.push_buf(BufferDesc { name: name.into(), elems, elem: ElemType::F32, elem_bytes, category, persistent: false, dynamic: false })
    }
    /// A transient f32 buffer whose size depends on routing; `bound` is its upper bound.
    pub fn dyn_buf(&mut self, name: impl Into<String>, bound: usize, category: MemCategory) -> BufId {
        let elem_bytes = self.elem_bytes;
        self.push_buf(BufferDesc { name: name.into(), elems: bound, elem: ElemType::F32, elem_bytes, category, persistent: false, dynamic: true })
    }
    /// A transient i32 buffer (indices, counts).
    pub fn index_buf(&mut self, name: impl Into<String>, elems: usize, category: MemCategory) -> BufId {
        self.push_buf(BufferDesc { name: name.into(), elems, elem: ElemType::I32, elem_bytes: 4, category, persistent: false, dynamic: false })
    }
    /// A parameter (f32 master copy) with its grad and Adam moments when training; asking
    /// again for a name already added returns the same parameter.
    pub fn param(&mut self, name: &str, elems: usize, init: ParamInit, expert: bool) -> BufId {
        self.param_with(name, elems, init, expert, None)
    }
    /// A parameter holding a slice of the tensor its init draws (tensor parallelism).
    pub fn param_sliced(&mut self, name: &str, elems: usize, init: ParamInit, expert: bool, slice: ParamSlice) -> BufId {
        self.param_with(name, elems, init, expert, Some(slice))
    }
    fn param_with(&mut self, name: &str, elems: usize, init: ParamInit, expert: bool, slice: Option<ParamSlice>) -> BufId {
        // Requested again (a later micro-batch's pass over the same layer): the same tensor.
        if let Some(p) = self.params.iter().find(|p| self.buffers[p.value.0 as usize].name == name) {
            assert_eq!(self.buffers[p.value.0 as usize].elems, elems, "parameter {name} requested with two sizes");
            return p.value;
        }
        let mk = |n: String, cat| BufferDesc { name: n, elems, elem: ElemType::F32, elem_bytes: 4, category: cat, persistent: true, dynamic: false };
        let value = self.push_buf(mk(name.to_string(), MemCategory::Params));
        let (grad, moments) = if self.training {
            let g = self.push_buf(mk(format!("{name}.grad"), MemCategory::Grads));
            let m = self.push_buf(mk(format!("{name}.adam_m"), MemCategory::OptimizerState));
            let v = self.push_buf(mk(format!("{name}.adam_v"), MemCategory::OptimizerState));
            (Some(g), Some((m, v)))
        } else {
            (None, None)
        };
        self.params.push(ParamDesc { value, grad, moments, init, expert, slice, half: None });
        value
    }
    /// The gradient buffer of a parameter (training plans only); while gradients are
    /// redirected, the parameter's transient gradient of the current micro-batch.
    pub fn grad(&mut self, value: BufId) -> BufId {
        let main = self.main_grad(value);
        let Some(pairs) = &self.redirect else { return main };
        if let Some((_, tmp)) = pairs.iter().find(|(v, _)| *v == value) {
            return *tmp;
        }
        let d = self.buffers[main.0 as usize].clone();
        let tmp = self.push_buf(BufferDesc { persistent: false, ..d });
        self.redirect.as_mut().expect("redirecting").push((value, tmp));
        tmp
    }
    fn main_grad(&self, value: BufId) -> BufId {
        self.params.iter().find(|p| p.value == value).and_then(|p| p.grad).expect("training param has a grad")
    }
    /// Parameters added so far.
    pub fn params(&self) -> &[ParamDesc] {
        &self.params
    }
    /// Append an op; reads, writes and deps come from `kind`.
    pub fn op(&mut self, name: impl Into<String>, stage: Stage, pass: Pass, kind: OpKind, flops: u64, bytes: u64) -> OpId {
        let id = OpId(self.ops.len() as u32);
        let (name, pass) = match (self.recompute, pass) {
            (true, Pass::Forward) => (format!("recompute.{}", name.into()), Pass::Backward),
            (_, pass) => (name.into(), pass),
        };
        let (reads, writes) = kind.io();
        let mut deps: Vec<OpId> = reads
            .iter()
            .chain(writes.iter())
            .filter_map(|b| self.last_writer[b.0 as usize])
            .collect();
        deps.sort();
        deps.dedup();
        for w in &writes {
            self.last_writer[w.0 as usize] = Some(id);
        }
        let stream = if stage.is_comm() { Stream::Comm } else { Stream::Compute };
        let name = match self.layer {
            Some(l) => format!("L{l}.{name}"),
            None => name,
        };
        self.ops.push(Op {
            id, name, stage, pass, stream, layer: self.layer, chunk: self.chunk, deps, kind, reads, writes,
            frees: Vec::new(), flops, bytes, collective: None,
        });
        id
    }
    /// Bytes of a buffer at 4 bytes per element: the unit every op's byte count is written
    /// in, whatever the plan's dtype; [`RankBuilder::finish`] rescales op bytes to the widths
    /// buffers are finally stored at.
    pub fn f32_bytes_of(&self, b: BufId) -> u64 {
        4 * self.buffers[b.0 as usize].elems as u64
    }
    /// Elements of a buffer (an upper bound when dynamic).
    pub fn elems_of(&self, b: BufId) -> u64 {
        self.buffers[b.0 as usize].elems as u64
    }
    /// Finish: every transient buffer is freed after its last use; a bf16 plan (transient
    /// buffers 2 bytes wide) gets the precision policy of [`super::precision`].
    pub fn finish(mut self) -> RankPlan {
        if self.elem_bytes == 2 {
            super::precision::apply_bf16(&mut self.buffers, &self.ops, &mut self.params);
            super::precision::rescale_op_bytes(&mut self.ops, &self.buffers, &self.params);
        }
        // Number each group's collectives in issue order (the order every member shares).
        let mut next_seq: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
        for op in &mut self.ops {
            if let Some(g) = op.kind.collective_group() {
                let seq = next_seq.entry(g.0).or_insert(0);
                op.collective = Some(crate::trace::CollectiveRef { group: g.0, seq: *seq });
                *seq += 1;
            }
        }
        let mut last_use: Vec<Option<usize>> = vec![None; self.buffers.len()];
        for (i, op) in self.ops.iter().enumerate() {
            for b in op.reads.iter().chain(op.writes.iter()) {
                last_use[b.0 as usize] = Some(i);
            }
        }
        for (b, lu) in last_use.iter().enumerate() {
            if let Some(i) = lu {
                if !self.buffers[b].persistent {
                    self.ops[*i].frees.push(BufId(b as u32));
                }
            }
        }
        RankPlan { rank: self.rank, buffers: self.buffers, ops: self.ops, params: self.params }
    }
}
