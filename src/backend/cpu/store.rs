//! Per-rank tensor storage that tracks the bytes really held per memory category, so the
//! plan's predicted peak can be checked against what the backend allocated.

use crate::plan::{BufId, BufferDesc, ElemType};
use crate::taxonomy::MemCategory;
use crate::trace::MemEvent;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// A buffer's contents.
#[derive(Debug, Clone)]
pub enum Data {
    /// Values.
    F32(Vec<f32>),
    /// Indices and counts.
    I32(Vec<i32>),
}

impl Data {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::I32(v) => v.len(),
        }
    }
    /// Whether no elements are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Buffers of one rank, with live-byte accounting and memory events.
pub struct Store {
    descs: Vec<BufferDesc>,
    data: Vec<Option<Arc<Data>>>,
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
}

/// A buffer access that broke the plan's contract (a backend or builder bug).
#[derive(Debug)]
pub struct StoreError(pub String);

impl Store {
    /// Empty store for `rank`'s buffers.
    pub fn new(rank: u32, descs: Vec<BufferDesc>, epoch: Instant) -> Self {
        let n = descs.len();
        Store { descs, data: vec![None; n], held: vec![0; n], in_use: [0; 7], rank, epoch, events: Vec::new(), peak_total: 0, at_peak: [0; 7] }
    }
    fn account(&mut self, id: BufId, bytes: u64) {
        let i = id.0 as usize;
        let old = self.held[i];
        if old == bytes {
            return;
        }
        let cat: MemCategory = self.descs[i].category;
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
    /// Name of a buffer.
    pub fn name(&self, id: BufId) -> &str {
        &self.descs[id.0 as usize].name
    }
    /// Store `data` as the buffer's contents. Static buffers are padded to their planned
    /// size (data larger than planned is an error); dynamic ones are held at their real size.
    pub fn put(&mut self, id: BufId, mut data: Data) -> Result<(), StoreError> {
        let d = &self.descs[id.0 as usize];
        match (&mut data, d.elem) {
            (Data::F32(_), ElemType::F32) | (Data::I32(_), ElemType::I32) => {}
            _ => return Err(StoreError(format!("buffer {} written with the wrong element type", d.name))),
        }
        if data.len() > d.elems {
            return Err(StoreError(format!("buffer {} got {} elements, planned {}", d.name, data.len(), d.elems)));
        }
        if !d.dynamic {
            match &mut data {
                Data::F32(v) => v.resize(d.elems, 0.0),
                Data::I32(v) => v.resize(d.elems, 0),
            }
        }
        let bytes = (data.len() * d.elem_bytes) as u64;
        self.data[id.0 as usize] = Some(Arc::new(data));
        self.account(id, bytes);
        Ok(())
    }
    /// Put f32 values.
    pub fn put_f32(&mut self, id: BufId, v: Vec<f32>) -> Result<(), StoreError> {
        self.put(id, Data::F32(v))
    }
    /// Put i32 values.
    pub fn put_i32(&mut self, id: BufId, v: Vec<i32>) -> Result<(), StoreError> {
        self.put(id, Data::I32(v))
    }
    /// Read f32 contents (a copy).
    pub fn f32(&self, id: BufId) -> Result<Vec<f32>, StoreError> {
        match self.data[id.0 as usize].as_deref() {
            Some(Data::F32(v)) => Ok(v.clone()),
            Some(_) => Err(StoreError(format!("buffer {} is not f32", self.name(id)))),
            None => Err(StoreError(format!("buffer {} read before it was written", self.name(id)))),
        }
    }
    /// Read i32 contents (a copy).
    pub fn i32(&self, id: BufId) -> Result<Vec<i32>, StoreError> {
        match self.data[id.0 as usize].as_deref() {
            Some(Data::I32(v)) => Ok(v.clone()),
            Some(_) => Err(StoreError(format!("buffer {} is not i32", self.name(id)))),
            None => Err(StoreError(format!("buffer {} read before it was written", self.name(id)))),
        }
    }
    /// Snapshot what an op reads, taking out the buffers it modifies in place, so the op
    /// can compute without holding the store's lock.
    pub fn view(&mut self, reads: &[BufId], writes: &[BufId]) -> OpView {
        let mut shared = HashMap::new();
        let mut owned = HashMap::new();
        for r in reads {
            if writes.contains(r) {
                if let Some(d) = self.data[r.0 as usize].take() {
                    owned.insert(*r, d);
                }
            } else if let Some(d) = &self.data[r.0 as usize] {
                shared.insert(*r, d.clone());
            }
        }
        let names = reads.iter().chain(writes).map(|b| (*b, self.name(*b).to_string())).collect();
        OpView { shared, owned, puts: Vec::new(), names }
    }
    /// [`Store::view`] where each `(read, copy)` pair's read is served from `copy` (a bf16
    /// plan's parameter read through its bf16 copy).
    pub fn view_through(&mut self, reads: &[BufId], writes: &[BufId], through: &[(BufId, BufId)]) -> OpView {
        let mut v = self.view(reads, writes);
        for (r, copy) in through {
            if let Some(d) = &self.data[copy.0 as usize] {
                v.shared.insert(*r, d.clone());
            }
        }
        v
    }
    /// Rounds a live f32 buffer's values to bf16 in place (bf16 storage on the cpu).
    pub fn round_bf16(&mut self, id: BufId) {
        if let Some(d) = self.data[id.0 as usize].as_mut() {
            if let Data::F32(v) = Arc::make_mut(d) {
                crate::math::bf16::round_in_place(v);
            }
        }
    }
    /// Store an op's outputs; buffers it took out and did not rewrite go back unchanged.
    pub fn apply(&mut self, view: OpView) -> Result<(), StoreError> {
        for (id, d) in view.owned {
            if !view.puts.iter().any(|(p, _)| *p == id) {
                self.data[id.0 as usize] = Some(d);
            }
        }
        for (id, d) in view.puts {
            self.put(id, d)?;
        }
        Ok(())
    }
    /// Release a buffer.
    pub fn free(&mut self, id: BufId) {
        self.data[id.0 as usize] = None;
        self.account(id, 0);
    }
    /// Bytes per category in use now.
    pub fn in_use(&self) -> [u64; 7] {
        self.in_use
    }
    /// Whether a buffer holds data.
    pub fn is_live(&self, id: BufId) -> bool {
        self.data[id.0 as usize].is_some()
    }
}

/// What one op sees: shared snapshots of its inputs, owned copies of what it modifies in
/// place, and the outputs it produced (applied to the store afterwards).
pub struct OpView {
    shared: HashMap<BufId, Arc<Data>>,
    owned: HashMap<BufId, Arc<Data>>,
    puts: Vec<(BufId, Data)>,
    names: HashMap<BufId, String>,
}

impl OpView {
    /// A view over data held outside a [`Store`] (the cuda backend's host fallback): `inputs`
    /// are the op's reads; those also in `writes` are handed over for in-place updates.
    pub fn detached(inputs: Vec<(BufId, Data)>, writes: &[BufId], names: HashMap<BufId, String>) -> OpView {
        let mut shared = HashMap::new();
        let mut owned = HashMap::new();
        for (id, d) in inputs {
            if writes.contains(&id) {
                owned.insert(id, Arc::new(d));
            } else {
                shared.insert(id, Arc::new(d));
            }
        }
        OpView { shared, owned, puts: Vec::new(), names }
    }
    /// The outputs the op produced, in order.
    pub fn into_puts(self) -> Vec<(BufId, Data)> {
        self.puts
    }
    fn name(&self, id: BufId) -> &str {
        self.names.get(&id).map_or("?", String::as_str)
    }
    fn get(&self, id: BufId) -> Result<&Data, StoreError> {
        self.shared
            .get(&id)
            .or_else(|| self.owned.get(&id))
            .map(|a| a.as_ref())
            .ok_or_else(|| StoreError(format!("buffer {} read before it was written", self.name(id))))
    }
    /// Read f32 contents.
    pub fn f32(&self, id: BufId) -> Result<&[f32], StoreError> {
        match self.get(id)? {
            Data::F32(v) => Ok(v),
            Data::I32(_) => Err(StoreError(format!("buffer {} is not f32", self.name(id)))),
        }
    }
    /// Read i32 contents.
    pub fn i32(&self, id: BufId) -> Result<&[i32], StoreError> {
        match self.get(id)? {
            Data::I32(v) => Ok(v),
            Data::F32(_) => Err(StoreError(format!("buffer {} is not i32", self.name(id)))),
        }
    }
    /// Take f32 contents to modify in place; give them back with [`OpView::put_f32`].
    pub fn take_f32(&mut self, id: BufId) -> Result<Vec<f32>, StoreError> {
        let arc = self
            .owned
            .remove(&id)
            .ok_or_else(|| StoreError(format!("buffer {} is not read-and-written by this op", self.name(id))))?;
        match Arc::try_unwrap(arc).unwrap_or_else(|a| (*a).clone()) {
            Data::F32(v) => Ok(v),
            Data::I32(_) => Err(StoreError(format!("buffer {} is not f32", self.name(id)))),
        }
    }
    /// Produce f32 output.
    pub fn put_f32(&mut self, id: BufId, v: Vec<f32>) -> Result<(), StoreError> {
        self.puts.push((id, Data::F32(v)));
        Ok(())
    }
    /// Produce i32 output.
    pub fn put_i32(&mut self, id: BufId, v: Vec<i32>) -> Result<(), StoreError> {
        self.puts.push((id, Data::I32(v)));
        Ok(())
    }
}
