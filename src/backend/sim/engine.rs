//! The discrete-event simulator. Each simulated rank has a compute and a comm stream; an op
//! starts when it heads its stream, the stream is free and its dependencies have finished.
//! A collective is coupled across ranks: it starts when every member has reached it (a rank
//! that arrives early waits, and the wait is part of its op, as in an NCCL kernel) and ends
//! for all members at once. While it transfers, it is a fluid flow over the links its
//! members use (each GPU's NVLink port, each node's NICs); flows that share a link split its
//! bandwidth equally, so two collectives on one link each take longer than one alone.
//!
//! Each stream's host thread runs ahead of its GPU stream by the ops' [`HostWork`]: an op
//! starts no earlier than its host issued it, and an op whose host work waits for the
//! stream to drain holds the stream for that work too.
//!
//! A collective's kernel, launched (after its host work) while a compute op's kernel runs
//! on the rank's other stream, gets the GPU's multiprocessors only when that op ends: the
//! compute kernel holds them, and the waiting counts as the collective's time, as it does
//! in a trace (2x H200, 2026-11-24: MPMoE's backward all-to-alls, 60 us alone, ended 55-73 us
//! after the 1.7 ms expert GEMM they were launched beside; `moelab calibrate`'s beside-GEMM
//! probe on H100 and H200: a 30 us all-to-all launched 300 us into a 1.4 ms GEMM ends with
//! it, one launched before it runs at its own speed).
//!
//! With [`Coupling::Symmetric`] only representative ranks are simulated: every other rank
//! is an image of one of them (same ops, same times), so a collective waits only for the
//! simulated members, and its share of each link accounts for the images that use the link
//! at the same moment.

use super::cost::{Cost, CollectivePart};
use super::profile::{CollectiveKind, Profile};
use crate::plan::GroupId;
use crate::taxonomy::Stream;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// One op as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOp {
    /// The stream it runs on.
    pub stream: Stream,
    /// Indices of ops of the same rank that must finish first.
    pub deps: Vec<u32>,
    /// Its cost on the GPU.
    pub cost: Cost,
    /// Kernels a compute op runs one after the other (at least 1): a collective launched
    /// beside it waits for the end of the running one.
    pub kernels: u32,
    /// What the host does before it can launch the op (compute ops; a collective's host
    /// time is part of its [`CollectivePart`]).
    pub host: HostWork,
}

/// An op's host work before its launch. The host thread of each stream enqueues ahead of
/// the GPU: work that does not wait for the stream is hidden while the stream has queued
/// work and delays the op only when the host falls behind; work that waits for the stream
/// to drain first (a synchronising copy) keeps the stream idle for all of it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostWork {
    /// Host seconds (copies, routing tables, row maps) before the launch.
    pub seconds: f64,
    /// The host first waits for the stream to drain (a synchronising device-to-host copy).
    pub sync: bool,
}

/// The ops of one simulated rank, in issue order.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRankInput {
    /// Global rank (placement on nodes, group membership).
    pub rank: u32,
    /// Ops in issue order.
    pub ops: Vec<SimOp>,
}

/// How the simulated ranks stand for the whole world.
#[derive(Debug, Clone, PartialEq)]
pub enum Coupling {
    /// Every member of every group is simulated.
    Full,
    /// The simulated ranks stand for all ranks; `images[i][op][part]` lists the groups that
    /// run the same collective part at the same time as simulated rank i's (its own
    /// included): their traffic shares the links with it.
    Symmetric {
        /// Concurrent groups per simulated rank, op and collective part.
        images: Vec<Vec<Vec<Vec<GroupId>>>>,
    },
}

/// Everything one simulation needs.
#[derive(Debug, Clone)]
pub struct SimInput<'a> {
    /// The simulated ranks.
    pub ranks: Vec<SimRankInput>,
    /// Members of each group, by [`GroupId`].
    pub groups: Vec<Vec<u32>>,
    /// Links and topology.
    pub profile: &'a Profile,
    /// Whether unsimulated ranks are images of simulated ones.
    pub coupling: Coupling,
}

/// When one op ran, in seconds from the step's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpTime {
    /// Start (for collectives: when the rank reached it).
    pub start: f64,
    /// End.
    pub end: f64,
}

/// The result: per simulated rank, per op, when it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// `times[i][op]` for simulated rank i.
    pub times: Vec<Vec<OpTime>>,
    /// Latest end over all ops.
    pub makespan: f64,
}

/// Why a simulation could not finish.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// Some ops never became ready: a collective whose members never all arrived, or a
    /// dependency cycle between streams.
    #[error("rank {rank} never finished op {op}: {reason}")]
    Stuck {
        /// Global rank.
        rank: u32,
        /// Op index.
        op: u32,
        /// What it waits for.
        reason: String,
    },
    /// A collective names a group member that is not simulated (full coupling).
    #[error("group {group} has member rank {member} that is not simulated (op {op} of rank {rank})")]
    MissingMember {
        /// Group id.
        group: u32,
        /// The missing rank.
        member: u32,
        /// The rank whose op names the group.
        rank: u32,
        /// The op index.
        op: u32,
    },
    /// An op names a dependency or a group that does not exist.
    #[error("rank {rank} op {op}: {message}")]
    BadInput {
        /// Global rank.
        rank: u32,
        /// Op index.
        op: u32,
        /// What is wrong.
        message: String,
    },
}

/// A link resource: one direction of a GPU's NVLink port, or one node NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LinkId {
    Port(u32),
    Nic(usize, usize),
}

/// Bytes a collective puts on each link, and its latency, before contention.
#[derive(Debug, Clone, PartialEq)]
struct Loads {
    latency: f64,
    /// (link, seconds the bytes take at the link's full effective bandwidth).
    links: Vec<(LinkId, f64)>,
}

/// The links a collective of `kind` with payload `bytes` per member uses over `members`.
fn loads(profile: &Profile, members: &[u32], kind: CollectiveKind, bytes: f64) -> Loads {
    let topo = &profile.topology;
    let n = members.len();
    if n <= 1 {
        return Loads { latency: 0.0, links: Vec::new() };
    }
    let mut per_node: HashMap<usize, usize> = HashMap::new();
    for &r in members {
        *per_node.entry(topo.node_of(r)).or_default() += 1;
    }
    let multi = per_node.len() > 1;
    let (intra, inter) = (&profile.intra, &profile.inter);
    let lat_link = if multi { inter } else { intra };
    let p = lat_link.collective(kind);
    let latency = (p.latency_us + p.step_us * kind.latency_steps(n)) * 1e-6;
    let nv_rate = intra.bandwidth * intra.collective(kind).efficiency;
    let nic_rate = inter.bandwidth * inter.collective(kind).efficiency;
    let mut acc: HashMap<LinkId, f64> = HashMap::new();
    for &r in members {
        let g = per_node[&topo.node_of(r)] as f64;
        let n_f = n as f64;
        let (nv, nic) = match kind {
            CollectiveKind::AllToAll => (bytes * (g - 1.0) / n_f, bytes * (n_f - g) / n_f),
            _ => {
                let w = kind.wire_bytes(bytes, n);
                if multi {
                    (w * (g - 1.0) / g, w / g)
                } else {
                    (w, 0.0)
                }
            }
        };
        if nv > 0.0 {
            *acc.entry(LinkId::Port(r)).or_default() += nv / nv_rate;
        }
        if nic > 0.0 {
            *acc.entry(LinkId::Nic(topo.node_of(r), topo.nic_of(r))).or_default() += nic / nic_rate;
        }
    }
    let mut links: Vec<(LinkId, f64)> = acc.into_iter().collect();
    links.sort_by_key(|(l, _)| match l {
        LinkId::Port(r) => (0, *r as usize, 0),
        LinkId::Nic(n, i) => (1, *n, *i),
    });
    Loads { latency, links }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct At(f64);
impl Eq for At {}
impl PartialOrd for At {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for At {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    ComputeDone { ri: usize, op: usize },
    /// A member's collective kernel is launched (its host work done) and joins its
    /// instance once no compute op holds the GPU.
    Launch { ri: usize, op: usize },
    LatencyDone { flow: usize },
    NetWake { epoch: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    at: At,
    seq: std::cmp::Reverse<u64>,
}

struct Flow {
    members: Vec<(usize, usize)>,
    /// (link index, seconds at full bandwidth, images of this flow on the link).
    links: Vec<(usize, f64, f64)>,
    in_transfer: bool,
    remaining: f64,
    rate: f64,
    done: bool,
}

struct Instance {
    arrived: Vec<(usize, usize)>,
    need: usize,
}

struct RankState {
    stream_ops: [Vec<usize>; 2],
    next: [usize; 2],
    busy: [bool; 2],
    /// Per stream, when its host thread has issued everything so far.
    host_free: [f64; 2],
    /// Per stream, the GPU span (kernel start, end) of the compute op running there and
    /// its kernels, of equal length.
    kernel: [Option<(f64, f64, u32)>; 2],
    done: Vec<bool>,
    part: Vec<usize>,
    times: Vec<OpTime>,
    /// seq[op][part]: which use of the part's group this is, on this rank.
    seq: Vec<Vec<u32>>,
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Compute => 0,
        Stream::Comm => 1,
    }
}

/// Simulate one step: when every op of every simulated rank starts and ends.
pub fn simulate(input: &SimInput) -> Result<Timeline, SimError> {
    Sim::new(input)?.run()
}

struct Sim<'a> {
    input: &'a SimInput<'a>,
    now: f64,
    heap: BinaryHeap<(Key, EventOrd)>,
    seq: u64,
    ranks: Vec<RankState>,
    index_of: HashMap<u32, usize>,
    instances: HashMap<(u32, u32), Instance>,
    flows: Vec<Flow>,
    link_index: HashMap<LinkId, usize>,
    link_load: Vec<f64>,
    epoch: u64,
    last_advance: f64,
    load_cache: HashMap<(u32, CollectiveKind, u64), Loads>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventOrd(Event);
impl PartialOrd for EventOrd {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for EventOrd {
    fn cmp(&self, _: &Self) -> Ordering {
        Ordering::Equal
    }
}

impl<'a> Sim<'a> {
    fn new(input: &'a SimInput<'a>) -> Result<Self, SimError> {
        let mut ranks = Vec::with_capacity(input.ranks.len());
        let mut index_of = HashMap::new();
        for (ri, r) in input.ranks.iter().enumerate() {
            index_of.insert(r.rank, ri);
            let mut stream_ops: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
            let mut uses: HashMap<u32, u32> = HashMap::new();
            let mut seq = Vec::with_capacity(r.ops.len());
            for (i, op) in r.ops.iter().enumerate() {
                stream_ops[stream_index(op.stream)].push(i);
                for d in &op.deps {
                    if *d as usize >= i {
                        return Err(SimError::BadInput { rank: r.rank, op: i as u32, message: format!("depends on op {d}, which is not issued before it") });
                    }
                }
                let mut s = Vec::new();
                if let Cost::Collective(parts) = &op.cost {
                    for p in parts {
                        if p.group.0 as usize >= input.groups.len() {
                            return Err(SimError::BadInput { rank: r.rank, op: i as u32, message: format!("names group {} of {}", p.group.0, input.groups.len()) });
                        }
                        let u = uses.entry(p.group.0).or_default();
                        s.push(*u);
                        *u += 1;
                    }
                }
                seq.push(s);
            }
            let n = r.ops.len();
            ranks.push(RankState {
                stream_ops,
                next: [0, 0],
                busy: [false, false],
                host_free: [0.0, 0.0],
                kernel: [None, None],
                done: vec![false; n],
                part: vec![0; n],
                times: vec![OpTime { start: f64::NAN, end: f64::NAN }; n],
                seq,
            });
        }
        if let Coupling::Full = input.coupling {
            for (ri, r) in input.ranks.iter().enumerate() {
                for (i, op) in r.ops.iter().enumerate() {
                    if let Cost::Collective(parts) = &op.cost {
                        for p in parts {
                            if let Some(m) = input.groups[p.group.0 as usize].iter().find(|m| !index_of.contains_key(m)) {
                                return Err(SimError::MissingMember { group: p.group.0, member: *m, rank: input.ranks[ri].rank, op: i as u32 });
                            }
                        }
                    }
                }
            }
        }
        Ok(Sim {
            input,
            now: 0.0,
            heap: BinaryHeap::new(),
            seq: 0,
            ranks,
            index_of,
            instances: HashMap::new(),
            flows: Vec::new(),
            link_index: HashMap::new(),
            link_load: Vec::new(),
            epoch: 0,
            last_advance: 0.0,
            load_cache: HashMap::new(),
        })
    }

    fn push(&mut self, at: f64, ev: Event) {
        self.seq += 1;
        self.heap.push((Key { at: At(at), seq: std::cmp::Reverse(self.seq) }, EventOrd(ev)));
    }

    fn run(mut self) -> Result<Timeline, SimError> {
        for ri in 0..self.ranks.len() {
            self.try_issue(ri);
        }
        while let Some((key, EventOrd(ev))) = self.heap.pop() {
            self.now = key.at.0;
            match ev {
                Event::ComputeDone { ri, op } => self.finish(ri, op),
                Event::Launch { ri, op } => self.launch(ri, op),
                Event::LatencyDone { flow } => {
                    self.advance();
                    self.flows[flow].in_transfer = true;
                    if self.flows[flow].links.is_empty() {
                        self.complete_flow(flow);
                    }
                    self.reschedule();
                }
                Event::NetWake { epoch } => {
                    if epoch != self.epoch {
                        continue;
                    }
                    self.advance();
                    // Done: nothing left, or less time left than the clock can still resolve
                    // at `now` (else a wake-up at now + tiny == now would repeat forever).
                    let tol = self.now.abs() * 1e-12;
                    let finished: Vec<usize> = (0..self.flows.len())
                        .filter(|&f| {
                            let fl = &self.flows[f];
                            !fl.done && fl.in_transfer && (fl.remaining <= 1e-9 || fl.remaining.max(0.0) / fl.rate <= tol)
                        })
                        .collect();
                    for f in finished {
                        self.complete_flow(f);
                    }
                    self.reschedule();
                }
            }
        }
        let mut makespan: f64 = 0.0;
        for (ri, st) in self.ranks.iter().enumerate() {
            if let Some(op) = st.done.iter().position(|d| !d) {
                let rank = self.input.ranks[ri].rank;
                let reason = match &self.input.ranks[ri].ops[op].cost {
                    Cost::Collective(parts) => {
                        let p = parts[st.part[op].min(parts.len() - 1)];
                        let key = (p.group.0, st.seq[op][st.part[op].min(parts.len() - 1)]);
                        match self.instances.get(&key) {
                            Some(inst) => format!("collective on group {} has {} of {} members", p.group.0, inst.arrived.len(), inst.need),
                            None => "its stream or dependencies never became free".into(),
                        }
                    }
                    Cost::Compute(_) => "its stream or dependencies never became free".into(),
                };
                return Err(SimError::Stuck { rank, op: op as u32, reason });
            }
            for t in &st.times {
                makespan = makespan.max(t.end);
            }
        }
        Ok(Timeline { times: self.ranks.into_iter().map(|r| r.times).collect(), makespan })
    }

    /// Start the head op of each free stream of rank `ri` whose dependencies are done (one
    /// per stream: a started op keeps its stream busy until it ends).
    fn try_issue(&mut self, ri: usize) {
        for s in 0..2 {
            self.issue_head(ri, s);
        }
    }

    fn issue_head(&mut self, ri: usize, s: usize) {
        let st = &self.ranks[ri];
        if st.busy[s] {
            return;
        }
        let Some(&op) = st.stream_ops[s].get(st.next[s]) else { return };
        let sim_op = &self.input.ranks[ri].ops[op];
        if !sim_op.deps.iter().all(|d| st.done[*d as usize]) {
            return;
        }
        let now = self.now;
        let st = &mut self.ranks[ri];
        st.next[s] += 1;
        st.busy[s] = true;
        st.times[op].start = now;
        match &sim_op.cost {
            Cost::Compute(d) => {
                // Synchronising host work starts once the stream drained (now) and keeps it
                // idle; other host work ran ahead and delays the launch only if it is late.
                let h = sim_op.host;
                let host_start = if h.sync { now.max(st.host_free[s]) } else { st.host_free[s] };
                st.host_free[s] = host_start + h.seconds;
                let start = if h.sync { host_start } else { now.max(st.host_free[s]) };
                let end = if h.sync { start + h.seconds + *d } else { start + *d };
                st.times[op].start = start;
                st.kernel[s] = Some((end - *d, end, sim_op.kernels.max(1)));
                self.push(end, Event::ComputeDone { ri, op });
            }
            Cost::Collective(parts) if parts.is_empty() => self.push(now, Event::ComputeDone { ri, op }),
            Cost::Collective(parts) => {
                // Its host work (a count exchange) waits for the stream: the host thread
                // issues nothing more before it is done.
                st.host_free[s] = st.host_free[s].max(now + parts[0].host_s);
                self.push(now + parts[0].host_s, Event::Launch { ri, op })
            }
        }
    }

    fn finish(&mut self, ri: usize, op: usize) {
        let now = self.now;
        let s = stream_index(self.input.ranks[ri].ops[op].stream);
        let st = &mut self.ranks[ri];
        st.done[op] = true;
        st.times[op].end = now;
        st.busy[s] = false;
        st.kernel[s] = None;
        // A finished op frees its stream and may satisfy a dependency of the other stream of
        // this rank; other ranks are released only through collectives.
        self.try_issue(ri);
    }

    /// A member's collective kernel was launched now: it joins the instance, or waits for the
    /// end of the kernel of a compute op running since before now (an op that begins at this
    /// instant comes after the already queued collective kernel; an op of several kernels
    /// holds it to the end of the one running).
    fn launch(&mut self, ri: usize, op: usize) {
        let now = self.now;
        // A group of one moves nothing between GPUs (no kernel of its own to wait).
        let alone = self.input.groups[self.part(ri, op).group.0 as usize].len() <= 1;
        // The end of the kernel running at `now`; a launch retried at a kernel boundary is not
        // held again for the next kernel by rounding (a relative 1e-9 of a kernel).
        let running = |&(a, b, n): &(f64, f64, u32)| {
            let piece = (b - a) / n as f64;
            let boundary = ((now - a) / piece - 1e-9).ceil();
            if boundary * piece + a <= now { now } else { (a + boundary * piece).min(b) }
        };
        let held = if alone { now } else { self.ranks[ri].kernel.iter().flatten().filter(|(a, b, _)| *a < now && now < *b).map(running).fold(now, f64::max) };
        if held > now {
            self.push(held, Event::Launch { ri, op });
        } else {
            self.arrive(ri, op);
        }
    }

    fn part(&self, ri: usize, op: usize) -> CollectivePart {
        match &self.input.ranks[ri].ops[op].cost {
            Cost::Collective(parts) => parts[self.ranks[ri].part[op]],
            Cost::Compute(_) => unreachable!("only collectives arrive"),
        }
    }

    fn arrive(&mut self, ri: usize, op: usize) {
        let p = self.part(ri, op);
        let key = (p.group.0, self.ranks[ri].seq[op][self.ranks[ri].part[op]]);
        let members = &self.input.groups[p.group.0 as usize];
        let need = members.iter().filter(|m| self.index_of.contains_key(m)).count();
        let inst = self.instances.entry(key).or_insert_with(|| Instance { arrived: Vec::new(), need });
        inst.arrived.push((ri, op));
        if inst.arrived.len() < inst.need {
            return;
        }
        let inst = self.instances.remove(&key).expect("present");
        // Members may bring different payloads (a dropless all-to-all's busier rank receives
        // more rows): the collective runs at the largest. (Each member's host work came
        // before its launch, so the last arrival is after the slowest.)
        let mut p = p;
        for &(r, o) in &inst.arrived {
            p.bytes = p.bytes.max(self.part(r, o).bytes);
        }
        self.start_flow(inst.arrived, p);
    }

    fn loads_of(&mut self, group: GroupId, kind: CollectiveKind, bytes: f64) -> Loads {
        let key = (group.0, kind, bytes.to_bits());
        if let Some(l) = self.load_cache.get(&key) {
            return l.clone();
        }
        let l = loads(self.input.profile, &self.input.groups[group.0 as usize], kind, bytes);
        self.load_cache.insert(key, l.clone());
        l
    }

    fn start_flow(&mut self, members: Vec<(usize, usize)>, p: CollectivePart) {
        let own = self.loads_of(p.group, p.kind, p.bytes);
        // Images of this collective on other groups load the same links at the same time.
        let mut images: HashMap<LinkId, f64> = HashMap::new();
        if let Coupling::Symmetric { images: all } = &self.input.coupling {
            let (ri, op) = members[0];
            let groups = all[ri][op][self.ranks[ri].part[op]].clone();
            for g in groups {
                for (l, _) in self.loads_of(g, p.kind, p.bytes).links {
                    *images.entry(l).or_default() += 1.0;
                }
            }
        }
        let mut links = Vec::with_capacity(own.links.len());
        for (l, secs) in own.links {
            let next = self.link_index.len();
            let idx = *self.link_index.entry(l).or_insert(next);
            if idx == self.link_load.len() {
                self.link_load.push(0.0);
            }
            links.push((idx, secs, images.get(&l).copied().unwrap_or(1.0).max(1.0)));
        }
        let flow = self.flows.len();
        self.flows.push(Flow { members, links, in_transfer: false, remaining: 1.0, rate: 0.0, done: false });
        // Host work (a count exchange) came before each member's launch.
        let at = self.now + own.latency;
        self.push(at, Event::LatencyDone { flow });
    }

    /// Move every transferring flow forward to `now` at its current rate.
    fn advance(&mut self) {
        let dt = self.now - self.last_advance;
        if dt > 0.0 {
            for f in self.flows.iter_mut().filter(|f| f.in_transfer && !f.done) {
                f.remaining -= f.rate * dt;
            }
        }
        self.last_advance = self.now;
    }

    /// Recompute fair shares and schedule the next completion.
    fn reschedule(&mut self) {
        for l in self.link_load.iter_mut() {
            *l = 0.0;
        }
        for f in self.flows.iter().filter(|f| f.in_transfer && !f.done) {
            for (l, _, m) in &f.links {
                self.link_load[*l] += m;
            }
        }
        let mut next = f64::INFINITY;
        for f in self.flows.iter_mut().filter(|f| f.in_transfer && !f.done) {
            // Alone, the flow takes max over links of its seconds there; sharing a link with
            // c flows stretches that link's part c times.
            let secs = f.links.iter().map(|(l, s, _)| s * self.link_load[*l]).fold(0.0, f64::max);
            f.rate = if secs > 0.0 { 1.0 / secs } else { f64::INFINITY };
            next = next.min(f.remaining.max(0.0) / f.rate);
        }
        self.epoch += 1;
        if next.is_finite() {
            let at = self.now + next;
            let epoch = self.epoch;
            self.push(at, Event::NetWake { epoch });
        }
        // Between collectives every flow is done: start the vector afresh so it does not
        // grow with the number of collectives (no event refers to a done flow).
        if self.flows.iter().all(|f| f.done) {
            self.flows.clear();
        }
    }

    fn complete_flow(&mut self, f: usize) {
        self.flows[f].done = true;
        let members = std::mem::take(&mut self.flows[f].members);
        for (ri, op) in members {
            let n_parts = match &self.input.ranks[ri].ops[op].cost {
                Cost::Collective(parts) => parts.len(),
                Cost::Compute(_) => 1,
            };
            self.ranks[ri].part[op] += 1;
            if self.ranks[ri].part[op] < n_parts {
                let host_s = self.part(ri, op).host_s;
                self.push(self.now + host_s, Event::Launch { ri, op });
            } else {
                self.finish(ri, op);
            }
        }
    }
}

/// Seconds a collective takes alone (no contention, everyone present): latency plus its
/// slowest link. For reports and tests.
pub fn alone_seconds(profile: &Profile, members: &[u32], kind: CollectiveKind, bytes: f64) -> f64 {
    let l = loads(profile, members, kind, bytes);
    l.latency + l.links.iter().map(|(_, s)| *s).fold(0.0, f64::max)
}
