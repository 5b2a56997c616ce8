//! External launch: `moelab run` started once per rank by torchrun (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
//! with exported MASTER_ADDR/MASTER_PORT). Only the environment is read here; no GPU, no
//! network, so every rule is testable anywhere.

use std::time::Duration;

/// Which launcher set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything setting RANK/WORLD_SIZE/LOCAL_RANK the same way).
    Torchrun,
    /// Slurm's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID).
    Slurm,
}

/// This process's place in an externally launched job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRank {
    /// Who launched it.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// Ranks in the job.
    pub world: usize,
    /// Rank on this node: the GPU it uses (see [`ExternalRank::device`]).
    pub local_rank: usize,
    /// Host of rank 0 (MASTER_ADDR).
    pub master_addr: String,
    /// Port of moelab's rendezvous on rank 0's host (MASTER_PORT, see [`detect`]).
    pub port: u16,
    /// How long ranks wait for each other at the rendezvous.
    pub timeout: Duration,
}

/// A mistake in the launch environment: the variable, what is wrong and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message} (fix: {fix})")]
pub struct EnvError {
    /// The environment variable(s) at fault.
    pub var: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

fn err(var: &str, message: impl Into<String>, fix: impl Into<String>) -> EnvError {
    EnvError { var: var.into(), message: message.into(), fix: fix.into() }
}

/// Default seconds ranks wait for each other (MOELAB_RENDEZVOUS_TIMEOUT_S overrides).
pub const DEFAULT_TIMEOUT_S: u64 = 60;

/// Reads the process environment; see [`detect`].
pub fn detect_from_env() -> Result<Option<ExternalRank>, EnvError> {
    detect(&|k| std::env::var(k).ok())
}

/// The external rank described by `env` (a variable lookup), `None` for a local launch (no
/// launcher variables, a one-task Slurm step, or MOELAB_LAUNCH=local, which the local
/// launcher sets for its own workers). The rendezvous port is MOELAB_RENDEZVOUS_PORT when
/// set, else MASTER_PORT + 1 when torchrun's agent already serves its store on MASTER_PORT
/// (TORCHELASTIC_USE_AGENT_STORE=True), else MASTER_PORT.
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<ExternalRank>, EnvError> {
    let get = |k: &str| env(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    match get("MOELAB_LAUNCH").as_deref() {
        None | Some("auto") => {}
        Some("local") => return Ok(None),
        Some(other) => return Err(err("MOELAB_LAUNCH", format!("MOELAB_LAUNCH={other} is not a launch mode"), "use \"local\" (one worker per visible GPU) or \"auto\", or unset it")),
    }
    let torch = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];
    let slurm = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"];
    let (launcher, names) = if torch.iter().any(|k| get(k).is_some()) {
        (Launcher::Torchrun, torch)
    } else if get("SLURM_PROCID").is_some() && get("SLURM_NTASKS").is_some_and(|n| n != "1") {
        (Launcher::Slurm, slurm)
    } else {
        return Ok(None);
    };
    let [rank_var, world_var, local_var] = names;
    let mut missing: Vec<&str> = names.iter().copied().filter(|k| get(k).is_none()).collect();
    missing.extend(["MASTER_ADDR", "MASTER_PORT"].into_iter().filter(|k| get(k).is_none()));
    if !missing.is_empty() {
        let fix = match launcher {
            Launcher::Torchrun => format!(
                "set all of {rank_var}, {world_var}, {local_var}, MASTER_ADDR, MASTER_PORT as torchrun does (or unset them, or MOELAB_LAUNCH=local, for a local launch of one worker per GPU)"
            ),
            Launcher::Slurm => "under srun export MASTER_ADDR (rank 0's host, e.g. $(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)) and MASTER_PORT (a free port, e.g. 29500) before srun".into(),
        };
        return Err(err(&missing.join(", "), format!("{} not set for an externally launched job", if missing.len() == 1 { "is" } else { "are" }), fix));
    }
    let num = |k: &str| -> Result<usize, EnvError> {
        let v = get(k).unwrap_or_default();
        v.parse().map_err(|_| err(k, format!("{k}={v} is not a non-negative integer"), format!("set {k} to a number such as 0")))
    };
    let (rank, world, local_rank) = (num(rank_var)?, num(world_var)?, num(local_var)?);
    if world == 0 {
        return Err(err(world_var, format!("{world_var}=0: a job needs at least one rank"), format!("set {world_var} to the spec's world size (dp*ep*tp*pp)")));
    }
    if rank >= world {
        return Err(err(rank_var, format!("{rank_var}={rank} is not below {world_var}={world}"), format!("ranks run from 0 to {}", world - 1)));
    }
    let master_addr = get("MASTER_ADDR").unwrap_or_default();
    let port_of = |k: &str| -> Result<u16, EnvError> {
        let v = get(k).unwrap_or_default();
        v.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| err(k, format!("{k}={v} is not a TCP port"), format!("set {k} to a free port in 1..=65535, e.g. 29500")))
    };
    let master_port = port_of("MASTER_PORT")?;
    let port = if get("MOELAB_RENDEZVOUS_PORT").is_some() {
        port_of("MOELAB_RENDEZVOUS_PORT")?
    } else if launcher == Launcher::Torchrun && get("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
        master_port.checked_add(1).ok_or_else(|| {
            err("MASTER_PORT", "torchrun's store holds MASTER_PORT=65535 and moelab's rendezvous needs the next port", "pick a lower --master-port, or set MOELAB_RENDEZVOUS_PORT")
        })?
    } else {
        master_port
    };
    let timeout = match get("MOELAB_RENDEZVOUS_TIMEOUT_S") {
        None => Duration::from_secs(DEFAULT_TIMEOUT_S),
        Some(v) => match v.parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
            _ => return Err(err("MOELAB_RENDEZVOUS_TIMEOUT_S", format!("MOELAB_RENDEZVOUS_TIMEOUT_S={v} is not a positive number of seconds"), format!("unset it (default {DEFAULT_TIMEOUT_S} s) or set e.g. 120"))),
        },
    };
    Ok(Some(ExternalRank { launcher, rank, world, local_rank, master_addr, port, timeout }))
}

impl ExternalRank {
    /// The variable names that carry rank, world size and local rank for this launcher.
    pub fn var_names(&self) -> (&'static str, &'static str, &'static str) {
        match self.launcher {
            Launcher::Torchrun => ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        }
    }

    /// The GPU ordinal this rank opens among `visible` GPUs: LOCAL_RANK, or the only one when
    /// the launcher bound one GPU per task (CUDA_VISIBLE_DEVICES of one device).
    pub fn device(&self, visible: usize) -> Result<usize, EnvError> {
        let (_, _, local_var) = self.var_names();
        if self.local_rank < visible {
            Ok(self.local_rank)
        } else if visible == 1 {
            Ok(0)
        } else {
            Err(err(
                local_var,
                format!("{local_var}={} but {visible} GPU(s) are visible on this node", self.local_rank),
                "start at most one rank per visible GPU on each node (torchrun --nproc-per-node, srun --ntasks-per-node), or bind one GPU per task",
            ))
        }
    }

    /// The spec-level problems of running a spec of `world` ranks as this rank with `visible`
    /// GPUs: `(field, message, fix)` as spec validation reports them.
    pub fn problems(&self, world: usize, visible: usize) -> Vec<(String, String, String)> {
        let (_, world_var, _) = self.var_names();
        let mut out = Vec::new();
        if self.world != world {
            out.push((
                "layout".to_string(),
                format!("{world_var}={} (from the launcher) but the spec's layout has world={world} (dp*ep*tp*pp)", self.world),
                format!("launch {world} processes (torchrun --nproc-per-node/--nnodes, srun -n {world}), or change the layout to {} ranks", self.world),
            ));
        }
        if let Err(e) = self.device(visible) {
            out.push(("run.backend".to_string(), e.message, e.fix));
        }
        out
    }

    /// `host:port` of rank 0's rendezvous.
    pub fn address(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.port)
        } else {
            format!("{}:{}", self.master_addr, self.port)
        }
    }
}
