//! Pipeline stages over micro-batches: the schedule (GPipe or 1F1B) of each stage's
//! forward and backward passes, the point-to-point exchanges between neighbouring stages
//! that it implies, and [`build`], which lays a stage's ops out in that order.
//!
//! Stage `s` sends micro-batch `j`'s activation to stage `s + 1` after its forward of `j`
//! and receives its gradient before its backward of `j`. Every exchange is one
//! [`OpKind::SendRecv`] over the 2-member group of the two neighbours, issued by both at the
//! same point of the group's sequence; where one side sends an activation right before it
//! receives a gradient and the other sends that gradient right before it receives that
//! activation (1F1B's steady state), the two messages travel in one exchange, as Megatron's
//! `send_forward_recv_backward` does, so the serial comm streams never wait on each other in
//! a cycle. The first micro-batch's backward writes the step's gradients; later ones write
//! their own and add them in ([`OpKind::GradAccum`], after each block: [`accumulate_grads`]),
//! so the optimizer runs once per step.

use crate::plan::{BufId, GroupId, OpKind, RankBuilder};
use crate::spec::PipelineSchedule;
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};
use std::collections::HashMap;

/// One step of a stage's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward of micro-batch j.
    Forward(usize),
    /// Backward of micro-batch j.
    Backward(usize),
}

/// The order of stage `stage`'s passes (of `stages`) over `micro` micro-batches; forwards
/// only when not training.
pub fn actions(schedule: PipelineSchedule, stages: usize, stage: usize, micro: usize, training: bool) -> Vec<Action> {
    use Action::*;
    if !training {
        return (0..micro).map(Forward).collect();
    }
    match schedule {
        PipelineSchedule::Gpipe => (0..micro).map(Forward).chain((0..micro).map(Backward)).collect(),
        PipelineSchedule::OneFOneB => {
            let warm = (stages - stage - 1).min(micro);
            let mut v: Vec<Action> = (0..warm).map(Forward).collect();
            for i in 0..micro - warm {
                v.push(Forward(warm + i));
                v.push(Backward(i));
            }
            v.extend((micro - warm..micro).map(Backward));
            v
        }
    }
}

/// The most micro-batches whose activations a stage holds at once under `actions` (forwards
/// done whose backward has not run).
#[cfg(test)]
fn in_flight(actions: &[Action]) -> usize {
    let mut live = 0usize;
    let mut most = 0;
    for a in actions {
        match a {
            Action::Forward(_) => live += 1,
            Action::Backward(_) => live = live.saturating_sub(1),
        }
        most = most.max(live);
    }
    most
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Act(usize),
    Grad(usize),
}

/// One exchange on the link between an upper stage `s` and the lower stage `s + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Micro-batch whose activation goes down, if any.
    pub act: Option<usize>,
    /// Micro-batch whose gradient goes up, if any.
    pub grad: Option<usize>,
    /// Where the upper stage issues it: before its action of this index (after the last
    /// when equal to the number of actions).
    pub upper_slot: usize,
    /// Where the lower stage issues it.
    pub lower_slot: usize,
}

/// The messages one side of a link handles, in its issue order, with their slots.
fn side(actions: &[Action], upper: bool) -> Vec<(usize, Msg)> {
    let mut v = Vec::new();
    for (a, act) in actions.iter().enumerate() {
        match (*act, upper) {
            // Upper: send the activation after the forward, receive the gradient before the backward.
            (Action::Forward(j), true) => v.push((a + 1, Msg::Act(j))),
            (Action::Backward(j), true) => v.push((a, Msg::Grad(j))),
            // Lower: receive the activation before the forward, send the gradient after the backward.
            (Action::Forward(j), false) => v.push((a, Msg::Act(j))),
            (Action::Backward(j), false) => v.push((a + 1, Msg::Grad(j))),
        }
    }
    v
}

/// The exchanges of the link between stages whose schedules are `upper` and `lower`, in the
/// order both issue them: a message both sides reach at the same point is one exchange; two
/// opposite messages that the sides reach in opposite orders travel together.
///
/// # Panics
/// When the two schedules cannot be paired this way (not the case for GPipe or 1F1B).
pub fn link_exchanges(upper: &[Action], lower: &[Action]) -> Vec<Exchange> {
    let (u, l) = (side(upper, true), side(lower, false));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    let pack = |a: Msg, b: Option<Msg>| {
        let mut e = (None, None);
        for m in std::iter::once(a).chain(b) {
            match m {
                Msg::Act(x) => e.0 = Some(x),
                Msg::Grad(x) => e.1 = Some(x),
            }
        }
        e
    };
    while i < u.len() && j < l.len() {
        if u[i].1 == l[j].1 {
            let (act, grad) = pack(u[i].1, None);
            out.push(Exchange { act, grad, upper_slot: u[i].0, lower_slot: l[j].0 });
            i += 1;
            j += 1;
        } else if i + 1 < u.len() && j + 1 < l.len() && u[i].1 == l[j + 1].1 && u[i + 1].1 == l[j].1 {
            let (act, grad) = pack(u[i].1, Some(u[i + 1].1));
            assert!(act.is_some() && grad.is_some(), "paired messages go in opposite directions");
            out.push(Exchange { act, grad, upper_slot: u[i + 1].0, lower_slot: l[j + 1].0 });
            i += 2;
            j += 2;
        } else {
            panic!("pipeline schedules cannot be paired at upper message {i} {:?} / lower message {j} {:?}", u[i].1, l[j].1);
        }
    }
    assert!(i == u.len() && j == l.len(), "every pipeline message has a partner");
    out
}

/// What one stage computes for one micro-batch, for [`build`].
pub trait StageWork {
    /// Forward state kept until the micro-batch's backward.
    type Saved;
    /// Forward of micro-batch `mb` on `input` (the activation received from the previous
    /// stage; `None` on the first stage, which loads the batch). Returns the activation for
    /// the next stage (`None` on the last stage, which computes the loss) and the state.
    fn forward(&mut self, b: &mut RankBuilder, mb: usize, input: Option<BufId>) -> (Option<BufId>, Self::Saved);
    /// Backward of micro-batch `mb` given the gradient of its output (received from the next
    /// stage; `None` on the last stage, whose loss gives it). Returns the gradient of the
    /// stage's input for the previous stage (`None` on the first stage).
    fn backward(&mut self, b: &mut RankBuilder, mb: usize, saved: Self::Saved, dout: Option<BufId>) -> Option<BufId>;
}

/// A stage's place in the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Pipe {
    /// Stages.
    pub stages: usize,
    /// This stage.
    pub stage: usize,
    /// Micro-batches per step.
    pub micro: usize,
    /// The schedule.
    pub schedule: PipelineSchedule,
    /// Whether backward passes are built.
    pub training: bool,
    /// The 2-member group with the previous stage's peer.
    pub up: Option<GroupId>,
    /// The 2-member group with the next stage's peer.
    pub down: Option<GroupId>,
    /// Elements of one micro-batch's activation (and of its gradient).
    pub act_elems: usize,
}

impl Pipe {
    /// Buffer name prefix of micro-batch `mb` (none with one micro-batch).
    pub fn prefix(&self, mb: usize) -> String {
        if self.micro > 1 { format!("mb{mb}.") } else { String::new() }
    }
}

#[derive(Clone, Copy)]
enum Link {
    Up,
    Down,
}

/// Lay out stage `pipe.stage`'s ops: its schedule's actions with the exchanges between them.
pub fn build<W: StageWork>(b: &mut RankBuilder, pipe: &Pipe, work: &mut W) {
    let sched = |s: usize| actions(pipe.schedule, pipe.stages, s, pipe.micro, pipe.training);
    let mine = sched(pipe.stage);
    let mut slots: Vec<Vec<(Link, Exchange)>> = vec![Vec::new(); mine.len() + 1];
    if pipe.stage > 0 {
        for e in link_exchanges(&sched(pipe.stage - 1), &mine) {
            slots[e.lower_slot].push((Link::Up, e));
        }
    }
    if pipe.stage + 1 < pipe.stages {
        for e in link_exchanges(&mine, &sched(pipe.stage + 1)) {
            slots[e.upper_slot].push((Link::Down, e));
        }
    }
    let mut st = State { act_in: HashMap::new(), grad_in: HashMap::new(), act_out: HashMap::new(), grad_out: HashMap::new() };
    let mut saved: HashMap<usize, W::Saved> = HashMap::new();
    let mut first_backward = true;
    for (k, slot) in slots.iter_mut().enumerate() {
        // Exchanges that send first, then those that only receive (each link keeps its order).
        let sends = |l: &Link, e: &Exchange| match l {
            Link::Down => e.act.is_some(),
            Link::Up => e.grad.is_some(),
        };
        slot.sort_by_key(|(l, e)| !sends(l, e));
        for (link, e) in slot.iter() {
            exchange(b, pipe, &mut st, *link, e);
        }
        let Some(action) = mine.get(k) else { break };
        match *action {
            Action::Forward(j) => {
                enter(b, pipe, j);
                let input = (pipe.stage > 0).then(|| st.act_in.remove(&j).expect("activation received before its forward"));
                let (out, s) = work.forward(b, j, input);
                if let Some(o) = out {
                    st.act_out.insert(j, o);
                }
                saved.insert(j, s);
            }
            Action::Backward(j) => {
                enter(b, pipe, j);
                let dout = (pipe.stage + 1 < pipe.stages).then(|| st.grad_in.remove(&j).expect("gradient received before its backward"));
                let redirect = !first_backward;
                first_backward = false;
                if redirect {
                    b.begin_grad_redirect();
                }
                let dx = work.backward(b, j, saved.remove(&j).expect("forward before backward"), dout);
                if redirect {
                    b.set_layer(None);
                    accumulate_grads(b);
                    b.end_grad_redirect();
                }
                if let (Some(d), true) = (dx, pipe.stage > 0) {
                    st.grad_out.insert(j, d);
                }
            }
        }
    }
    b.set_layer(None);
    b.set_chunk(None);
    b.set_buf_prefix("");
}

/// Add the gradients a later micro-batch's backward produced since the last call into the
/// step's (one [`OpKind::GradAccum`] in the current layer), releasing them; nothing for the
/// step's first backward, which writes the step's gradients itself. A stage calls it after
/// each block, so at most one block's micro-batch gradients are live at once.
pub fn accumulate_grads(b: &mut RankBuilder) {
    let pairs = b.take_grad_redirect();
    if pairs.is_empty() {
        return;
    }
    let elems: u64 = pairs.iter().map(|p| b.elems_of(p.0)).sum();
    b.op("grad_accum", Stage::GradAccum, Pass::Backward, OpKind::GradAccum { pairs }, elems, 12 * elems);
}

struct State {
    act_in: HashMap<usize, BufId>,
    grad_in: HashMap<usize, BufId>,
    act_out: HashMap<usize, BufId>,
    grad_out: HashMap<usize, BufId>,
}

fn enter(b: &mut RankBuilder, pipe: &Pipe, mb: usize) {
    b.set_buf_prefix(pipe.prefix(mb));
    b.set_chunk((pipe.micro > 1).then_some(mb as u32));
    b.set_layer(None);
}

fn exchange(b: &mut RankBuilder, pipe: &Pipe, st: &mut State, link: Link, e: &Exchange) {
    b.set_layer(None);
    b.set_buf_prefix("");
    b.set_chunk((pipe.micro > 1).then_some(e.act.or(e.grad).expect("an exchange carries a message") as u32));
    let recv_buf = |b: &mut RankBuilder, mb: usize, what: &str| {
        b.buf(format!("{}pp.{what}", pipe.prefix(mb)), pipe.act_elems, Mc::CommBuffers)
    };
    let (group, send, recv, name) = match link {
        Link::Down => {
            let send = e.act.map(|j| st.act_out.remove(&j).expect("forward before its send"));
            let recv = e.grad.map(|i| {
                let r = recv_buf(b, i, "grad_in");
                st.grad_in.insert(i, r);
                r
            });
            let name = match (send.is_some(), recv.is_some()) {
                (true, true) => "pp_send_act_recv_grad",
                (true, false) => "pp_send_act",
                _ => "pp_recv_grad",
            };
            (pipe.down.expect("a next stage"), send, recv, name)
        }
        Link::Up => {
            let send = e.grad.map(|i| st.grad_out.remove(&i).expect("backward before its send"));
            let recv = e.act.map(|j| {
                let r = recv_buf(b, j, "act_in");
                st.act_in.insert(j, r);
                r
            });
            let name = match (send.is_some(), recv.is_some()) {
                (true, true) => "pp_send_grad_recv_act",
                (true, false) => "pp_send_grad",
                _ => "pp_recv_act",
            };
            (pipe.up.expect("a previous stage"), send, recv, name)
        }
    };
    let pass = if e.grad.is_some() { Pass::Backward } else { Pass::Forward };
    let bytes = send.or(recv).map_or(0, |x| b.f32_bytes_of(x));
    b.op(name, Stage::SendRecv, pass, OpKind::SendRecv { group, send, recv }, 0, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    #[test]
    fn one_f_one_b_warms_up_by_distance_to_the_last_stage() {
        let s0 = actions(PipelineSchedule::OneFOneB, 2, 0, 4, true);
        assert_eq!(s0, vec![Forward(0), Forward(1), Backward(0), Forward(2), Backward(1), Forward(3), Backward(2), Backward(3)]);
        let s1 = actions(PipelineSchedule::OneFOneB, 2, 1, 4, true);
        assert_eq!(s1, vec![Forward(0), Backward(0), Forward(1), Backward(1), Forward(2), Backward(2), Forward(3), Backward(3)]);
        assert_eq!(in_flight(&s0), 2);
        assert_eq!(in_flight(&actions(PipelineSchedule::Gpipe, 2, 0, 4, true)), 4);
    }

    #[test]
    fn exchanges_pair_both_sides() {
        for sched in [PipelineSchedule::Gpipe, PipelineSchedule::OneFOneB] {
            for (stages, micro) in [(2, 1), (2, 4), (3, 2), (4, 8), (4, 3)] {
                for s in 0..stages - 1 {
                    let (u, l) = (actions(sched, stages, s, micro, true), actions(sched, stages, s + 1, micro, true));
                    let ex = link_exchanges(&u, &l);
                    let acts: Vec<usize> = ex.iter().filter_map(|e| e.act).collect();
                    let grads: Vec<usize> = ex.iter().filter_map(|e| e.grad).collect();
                    assert_eq!(acts, (0..micro).collect::<Vec<_>>());
                    assert_eq!(grads, (0..micro).collect::<Vec<_>>());
                    // An activation is sent after its forward upstream and received before its forward downstream.
                    for e in &ex {
                        if let Some(j) = e.act {
                            assert!(u[..e.upper_slot].contains(&Forward(j)));
                            assert!(!l[..e.lower_slot].contains(&Forward(j)));
                        }
                        if let Some(j) = e.grad {
                            assert!(l[..e.lower_slot].contains(&Backward(j)));
                            assert!(!u[..e.upper_slot].contains(&Backward(j)));
                        }
                    }
                }
            }
        }
        // 1F1B's steady state sends and receives in one exchange.
        let ex = link_exchanges(&actions(PipelineSchedule::OneFOneB, 2, 0, 4, true), &actions(PipelineSchedule::OneFOneB, 2, 1, 4, true));
        assert_eq!(ex.iter().filter(|e| e.act.is_some() && e.grad.is_some()).count(), 3);
    }
}
