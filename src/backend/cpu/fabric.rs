//! In-process collectives with NCCL's semantics: every member of a group calls the n-th
//! collective on that group in the same order; a call returns when all members arrived.
//! A failing rank aborts the fabric and releases every waiter; waits time out.

use crate::backend::BackendError;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

type Deposit = Vec<Vec<f32>>;

struct Slot {
    deposits: Vec<Option<Deposit>>,
    takers: usize,
}

#[derive(Default)]
struct State {
    slots: HashMap<(u32, u64), Slot>,
    seq: HashMap<(u32, u32), u64>,
    aborted: Option<u32>,
}

/// The shared "network" of a cpu run.
pub struct Fabric {
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

impl Fabric {
    /// A fabric whose waits give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Fabric { state: Mutex::new(State::default()), cv: Condvar::new(), timeout }
    }

    /// Mark the run failed by `rank`; every current and future wait returns `Aborted`.
    pub fn abort(&self, rank: u32) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.aborted.get_or_insert(rank);
        self.cv.notify_all();
    }

    /// Whether some rank failed.
    pub fn is_aborted(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).aborted.is_some()
    }

    /// Deposit `parts` as member `me` of `group` (ranks `members`), wait for all members,
    /// then compute this member's result from every member's deposit (member order).
    pub fn collective<R>(
        &self,
        group: u32,
        members: &[u32],
        me: u32,
        op: &str,
        parts: Deposit,
        finish: impl FnOnce(&[&Deposit], usize) -> R,
    ) -> Result<R, BackendError> {
        let my = members.iter().position(|&r| r == me).expect("rank is a member of its group");
        let n = members.len();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(by) = st.aborted {
            return Err(BackendError::Aborted { rank: me, by });
        }
        let seq = {
            let s = st.seq.entry((group, me)).or_insert(0);
            *s += 1;
            *s - 1
        };
        let key = (group, seq);
        st.slots.entry(key).or_insert_with(|| Slot { deposits: (0..n).map(|_| None).collect(), takers: n }).deposits[my] = Some(parts);
        self.cv.notify_all();
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(by) = st.aborted {
                return Err(BackendError::Aborted { rank: me, by });
            }
            let slot = st.slots.get(&key).expect("slot lives until every member took its result");
            if slot.deposits.iter().all(Option::is_some) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = members.iter().zip(&slot.deposits).filter(|(_, d)| d.is_none()).map(|(r, _)| *r).collect();
                st.aborted.get_or_insert(me);
                self.cv.notify_all();
                return Err(BackendError::Timeout { rank: me, op: op.to_string(), missing, secs: self.timeout.as_secs() });
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        let slot = st.slots.get_mut(&key).expect("present");
        let refs: Vec<&Deposit> = slot.deposits.iter().map(|d| d.as_ref().expect("all deposited")).collect();
        let out = finish(&refs, my);
        slot.takers -= 1;
        if slot.takers == 0 {
            st.slots.remove(&key);
        }
        Ok(out)
    }
}
