//! Resolution (defaults that depend on other fields) and validation. Every rule names the
//! fields involved and says how to fix them; all problems are reported together.

use super::{BackendKind, ExperimentSpec, Variant};
use std::fmt;

/// One violated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted field path, e.g. `layout.ep`.
    pub field: String,
    /// What is wrong, with the values.
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

/// How the problem of a cuda spec on a machine with too few GPUs begins.
const CUDA_NEEDS_GPUS: &str = "backend \"cuda\" needs one GPU per rank";

impl Problem {
    /// Whether this is only the machine lacking GPUs for a cuda spec (the spec itself may be
    /// fine: `moelab validate` checks it anyway and says so).
    pub fn is_missing_gpus(&self) -> bool {
        self.field == "run.backend" && self.message.starts_with(CUDA_NEEDS_GPUS)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.field, self.message, self.fix)
    }
}

/// Why a spec was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read experiment file {path}: {message}")]
    Io {
        /// File path.
        path: String,
        /// OS error.
        message: String,
    },
    /// Malformed TOML, an unknown field or a value of the wrong type.
    #[error("{}", parse_message(.file, .location, .message))]
    Parse {
        /// What the TOML parser said.
        message: String,
        /// Line and column, 1-based.
        location: Option<(usize, usize)>,
        /// File, when read from one.
        file: Option<String>,
    },
    /// Well-formed but inconsistent.
    #[error("{}", invalid_message(.file, .problems))]
    Invalid {
        /// Every violated rule.
        problems: Vec<Problem>,
        /// File, when read from one.
        file: Option<String>,
    },
}

fn parse_message(file: &Option<String>, loc: &Option<(usize, usize)>, message: &str) -> String {
    let place = match (file, loc) {
        (Some(f), Some((l, c))) => format!("{f}:{l}:{c}: "),
        (None, Some((l, c))) => format!("line {l}, column {c}: "),
        (Some(f), None) => format!("{f}: "),
        (None, None) => String::new(),
    };
    format!("{place}invalid TOML: {}", message.trim())
}

fn invalid_message(file: &Option<String>, problems: &[Problem]) -> String {
    let head = match file {
        Some(f) => format!("{f}: invalid experiment"),
        None => "invalid experiment".to_string(),
    };
    let body: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
    format!("{head}:\n{}", body.join("\n"))
}

impl SpecError {
    /// Attach the file name to the error.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        let name = Some(path.display().to_string());
        match self {
            SpecError::Parse { message, location, .. } => SpecError::Parse { message, location, file: name },
            SpecError::Invalid { problems, .. } => SpecError::Invalid { problems, file: name },
            other => other,
        }
    }
    /// The violated rules (empty for I/O and parse errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            SpecError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: String, fix: impl Into<String>) {
        self.problems.push(Problem { field: field.to_string(), message, fix: fix.into() });
    }
    fn positive(&mut self, field: &str, value: usize) {
        if value == 0 {
            self.fail(field, format!("{field}=0 must be at least 1"), format!("set {field} to a positive integer"));
        }
    }
}

/// The largest size of one model dimension moelab plans.
pub const MAX_DIM: usize = 1 << 24;
/// The most elements one tensor of a rank may hold (4 TiB in f32): beyond any GPU or host,
/// and far from overflowing the byte counts of a plan.
pub const MAX_TENSOR_ELEMS: u128 = 1 << 40;
/// The most elements the expert blocks' bound (`n_experts x tokens_per_rank x d`) may reach.
pub const MAX_BLOCK_BOUND_ELEMS: u128 = 1 << 48;

/// Sizes a plan can hold: every dimension up to [`MAX_DIM`], the model's largest tensors (the
/// expert weights, the routed rows, the router's logits, the attention scores) up to
/// [`MAX_TENSOR_ELEMS`] and the expert blocks' bound up to [`MAX_BLOCK_BOUND_ELEMS`], refused
/// before any work starts.
fn check_sizes(c: &mut Checker, m: &super::ModelSpec) {
    let bb = m.backbone.as_ref();
    let dims = [
        ("model.d_model", Some(m.d_model)), ("model.d_ffn", Some(m.d_ffn)), ("model.n_experts", Some(m.n_experts)),
        ("model.top_k", Some(m.top_k)), ("model.n_layers", Some(m.n_layers)), ("model.tokens_per_rank", m.tokens_per_rank),
        ("model.batch", m.batch), ("model.seq_len", m.seq_len), ("model.backbone.n_heads", bb.map(|b| b.n_heads)),
        ("model.backbone.d_mlp", bb.map(|b| b.d_mlp)),
    ];
    let mut too_big = false;
    for (field, v) in dims {
        if let Some(v) = v.filter(|v| *v > MAX_DIM) {
            too_big = true;
            c.fail(field, format!("{field}={v} is above the largest size moelab plans ({MAX_DIM})"), format!("set {field} to at most {MAX_DIM}"));
        }
    }
    if too_big {
        return;
    }
    let (t, mm, f, e, k) = (m.tokens_per_rank.unwrap_or(0) as u128, m.d_model as u128, m.d_ffn as u128, m.n_experts as u128, m.top_k as u128);
    let (batch, seq, heads, mlp) = (m.batch.unwrap_or(0) as u128, m.seq_len.unwrap_or(0) as u128, bb.map_or(0, |b| b.n_heads) as u128, bb.map_or(0, |b| b.d_mlp) as u128);
    let tensors = [
        ("model.d_ffn", "the expert weights (n_experts x d_model x d_ffn)", e * mm * f),
        ("model.tokens_per_rank", "the routed rows (tokens_per_rank x top_k x the larger of d_model and d_ffn)", t * k * mm.max(f)),
        ("model.n_experts", "the router's logits (tokens_per_rank x n_experts)", t * e),
        ("model.seq_len", "the attention scores (batch x n_heads x seq_len^2)", batch * heads * seq * seq),
        ("model.backbone.d_mlp", "the dense MLP's activations (tokens_per_rank x d_mlp)", t * mlp),
    ];
    for (field, what, n) in tensors {
        if n > MAX_TENSOR_ELEMS {
            c.fail(field, format!("{what} would hold {n} elements, above the {MAX_TENSOR_ELEMS} one tensor may hold"), format!("lower {field} or the sizes it multiplies"));
        }
    }
    // The expert blocks' bound over an expert-parallel group (a capacity block holds at most
    // the group's tokens): far past any memory, but kept below where byte counts summed over
    // ranks would wrap.
    let blocks = e * t * mm.max(f);
    if blocks > MAX_BLOCK_BOUND_ELEMS {
        c.fail("model.n_experts", format!("the expert blocks' bound (n_experts x tokens_per_rank x the larger of d_model and d_ffn) is {blocks} elements, above {MAX_BLOCK_BOUND_ELEMS}"),
            "lower n_experts, tokens_per_rank, d_model or d_ffn".to_string());
    }
}

/// The divisors of n (found in O(sqrt n)), listed for fix messages; long lists are cut.
fn divisors(n: usize) -> String {
    // Beyond any real size (a size check names the field): listing would take seconds.
    if n > 1 << 40 {
        return "1, ...".into();
    }
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1usize;
    while d.saturating_mul(d) <= n {
        if n % d == 0 {
            small.push(d);
            if d != n / d {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    let shown: Vec<String> = small.iter().take(12).map(|d| d.to_string()).collect();
    if small.len() > 12 {
        format!("{}, ... ({} divisors)", shown.join(", "), small.len())
    } else {
        shown.join(", ")
    }
}

/// Fill derived defaults and check every rule; returns the resolved spec.
pub fn resolve_and_validate(mut spec: ExperimentSpec) -> Result<ExperimentSpec, SpecError> {
    let mut c = Checker { problems: Vec::new() };
    let m = &mut spec.model;

    if spec.name.trim().is_empty() {
        c.fail("name", "name is empty".into(), "give the experiment a short name, e.g. name = \"quickstart\"");
    } else if !spec.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
        c.fail("name", format!("name={:?} has characters other than letters, digits, '-', '_' and '.'", spec.name),
            "use a file-name-safe name, e.g. \"topk-ep4\"");
    }
    c.positive("model.d_model", m.d_model);
    c.positive("model.d_ffn", m.d_ffn);
    c.positive("model.n_experts", m.n_experts);
    c.positive("model.top_k", m.top_k);
    c.positive("model.n_layers", m.n_layers);
    if m.top_k > m.n_experts && m.n_experts > 0 {
        c.fail("model.top_k", format!("top_k={} exceeds n_experts={}", m.top_k, m.n_experts),
            format!("choose top_k between 1 and {}", m.n_experts));
    }
    /// Slots per token an expert may get before a capacity factor is refused as a mistake.
    const MAX_SLOTS_PER_TOKEN: f64 = 16.0;
    match (m.dropless, m.capacity_factor) {
        (true, Some(cf)) => c.fail("model.capacity_factor",
            format!("capacity_factor={cf} conflicts with dropless=true"),
            "remove capacity_factor, or set dropless = false"),
        (false, Some(cf)) if !cf.is_finite() => c.fail("model.capacity_factor",
            format!("capacity_factor={cf} must be a finite number (> 0 fixed, 0 dropless, < 0 bounded by the real load)"),
            "use e.g. 1.0 or 1.25, -1.25 for min(1.25 x the even share, the largest load), or set dropless = true"),
        // ceil(cf * k * T / E) slots per expert: from E / k on every token fits, so a larger
        // factor only grows buffers; far beyond it (1e300) the slot count overflows.
        // (A negative factor is bounded by the step's largest load, so any size is safe:
        // Tutel's -100 means "as many as the load needs".)
        (false, Some(cf)) if m.top_k > 0 && m.n_experts >= m.top_k && cf > MAX_SLOTS_PER_TOKEN * (m.n_experts as f64 / m.top_k as f64) => {
            let most = m.n_experts as f64 / m.top_k as f64;
            c.fail("model.capacity_factor",
                format!("capacity_factor={cf:?} gives each expert over {MAX_SLOTS_PER_TOKEN} times more slots than there are tokens (n_experts / top_k = {most} already holds every token)"),
                format!("keep capacity_factor <= {most} ({most} drops no token), or set dropless = true"))
        }
        // Tutel's convention: cf = 0 is dropless.
        (false, Some(0.0)) => {
            m.dropless = true;
            m.capacity_factor = None;
        }
        (false, None) => m.capacity_factor = Some(1.25),
        _ => {}
    }
    if !(m.aux_loss_coef.is_finite() && m.aux_loss_coef >= 0.0) {
        c.fail("model.aux_loss_coef", format!("aux_loss_coef={} must be >= 0", m.aux_loss_coef), "use e.g. 0.01, or 0 to disable");
    }

    // Tokens: any consistent subset of tokens_per_rank, batch, seq_len.
    for (f, v) in [("model.tokens_per_rank", m.tokens_per_rank), ("model.batch", m.batch), ("model.seq_len", m.seq_len)] {
        if v == Some(0) {
            c.positive(f, 0);
        }
    }
    let any_zero = [m.tokens_per_rank, m.batch, m.seq_len].contains(&Some(0));
    match (m.tokens_per_rank, m.batch, m.seq_len) {
        _ if any_zero => {}
        (None, None, None) | (None, Some(_), None) | (None, None, Some(_)) => c.fail("model.tokens_per_rank",
            "the token count is not given".into(),
            "set model.tokens_per_rank, or both model.batch and model.seq_len"),
        (Some(t), b, s) => {
            let split = match (b, s) {
                (Some(b), Some(s)) => match b.checked_mul(s) {
                    Some(p) if p == t => Some((b, s)),
                    _ => {
                        c.fail("model.tokens_per_rank", format!("tokens_per_rank={t} is not batch={b} x seq_len={s}"),
                            "make tokens_per_rank = batch * seq_len, or give only one of them");
                        None
                    }
                },
                (Some(b), None) if t % b == 0 => Some((b, t / b)),
                (None, Some(s)) if t % s == 0 => Some((t / s, s)),
                (Some(b), None) => {
                    c.fail("model.tokens_per_rank", format!("batch={b} does not divide tokens_per_rank={t}"),
                        format!("choose batch from {{{}}}", divisors(t)));
                    None
                }
                (None, Some(s)) => {
                    c.fail("model.tokens_per_rank", format!("seq_len={s} does not divide tokens_per_rank={t}"),
                        format!("choose seq_len from {{{}}}", divisors(t)));
                    None
                }
                (None, None) => Some((1, t)),
            };
            if let Some((b, s)) = split {
                m.batch = Some(b);
                m.seq_len = Some(s);
            }
        }
        (None, Some(b), Some(s)) => match b.checked_mul(s) {
            Some(t) => m.tokens_per_rank = Some(t),
            None => c.fail("model.batch", format!("batch={b} x seq_len={s} overflows"), "use realistic sizes"),
        },
    }
    check_sizes(&mut c, m);
    if let Some(bb) = &m.backbone {
        if bb.n_heads > 0 && m.d_model % bb.n_heads != 0 {
            c.fail("model.backbone.n_heads", format!("n_heads={} does not divide d_model={}", bb.n_heads, m.d_model),
                format!("choose n_heads from {{{}}}", divisors(m.d_model)));
        }
        if bb.n_heads == 0 && bb.d_mlp == 0 {
            c.fail("model.backbone", "the backbone has neither attention (n_heads) nor a dense MLP (d_mlp)".into(),
                "set n_heads and/or d_mlp, or remove [model.backbone]");
        }
    }

    // Layout.
    let l = &mut spec.layout;
    for (f, v) in [("layout.dp", l.dp), ("layout.tp", l.tp), ("layout.ep", l.ep), ("layout.pp", l.pp)] {
        c.positive(f, v);
    }
    let degrees = [l.dp, l.ep, l.tp, l.pp];
    let product = degrees.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
    match (l.world, product) {
        _ if degrees.contains(&0) => {}
        (_, None) => c.fail("layout.dp", format!("dp*ep*tp*pp = {}*{}*{}*{} overflows", l.dp, l.ep, l.tp, l.pp),
            "use degrees whose product is the number of ranks"),
        (Some(0), _) => c.positive("layout.world", 0),
        (Some(w), Some(product)) if w != product => c.fail("layout.world",
            format!("world={w} is not dp*ep*tp*pp = {}*{}*{}*{} = {product}", l.dp, l.ep, l.tp, l.pp),
            format!("set world = {product}, or change the degrees so that their product is {w}")),
        (_, Some(product)) => l.world = Some(product),
    }
    let n_experts = spec.model.n_experts;
    // Tutel splits each expert over s = ep / E ranks when the expert-parallel world is larger.
    let sharded = spec.variant == Variant::Tutel && l.ep > n_experts;
    if sharded && n_experts > 0 && !l.ep.is_multiple_of(n_experts) {
        c.fail("layout.ep", format!("ep={} exceeds n_experts={n_experts} but is not a multiple of it: tutel splits each expert over s = ep / n_experts ranks", l.ep),
            format!("choose ep from {{{}}} or a multiple of {n_experts}", divisors(n_experts)));
    } else if !sharded && l.ep > 0 && n_experts > 0 && !n_experts.is_multiple_of(l.ep) {
        c.fail("layout.ep", format!("ep={} does not divide n_experts={n_experts}", l.ep),
            format!("choose ep from {{{}}}", divisors(n_experts)));
    }
    if spec.variant == Variant::Topk {
        if l.tp > 1 {
            c.fail("layout.tp", format!("variant topk has no tensor parallelism (tp={})", l.tp),
                "set tp = 1, or use variant \"ted\" or \"ppmoe\" (tensor-parallel experts)");
        }
        if l.pp > 1 {
            c.fail("layout.pp", format!("variant topk has no pipeline stages (pp={})", l.pp),
                "set pp = 1, or use variant \"ppmoe\"");
        }
    }
    check_mpmoe(&mut c, &mut spec);
    check_tutel(&mut c, &mut spec);
    check_shortcut(&mut c, &spec);
    check_ted(&mut c, &mut spec);
    if !spec.variant.is_implemented() {
        c.fail("variant", format!("variant {:?} has no plan builder in this build yet", spec.variant.as_str()),
            "use variant = \"topk\"; the others arrive with the seed-variants work");
    }

    // Run.
    let world = spec.world();
    let r = &mut spec.run;
    c.positive("run.steps", r.steps);
    if !(r.lr.is_finite() && r.lr > 0.0) {
        c.fail("run.lr", format!("lr={} must be a positive number", r.lr), "use e.g. 1e-3");
    }
    match r.backend {
        // auto: the GPUs when there are enough of them for the layout, else the cpu
        // reference (bf16 plans there: f32 math with bf16 storage).
        BackendKind::Auto => {
            // Under torchrun/srun (one process per rank) this process needs its own GPU only.
            let gpus = crate::backend::cuda::visible_gpus();
            let enough = match crate::backend::cuda::external::detect_from_env() {
                Ok(Some(ext)) => ext.problems(world, gpus).is_empty(),
                _ => gpus >= world,
            };
            r.backend = if enough && gpus > 0 { BackendKind::Cuda } else { BackendKind::Cpu };
        }
        BackendKind::Cpu => {}
        BackendKind::Cuda => {
            let gpus = crate::backend::cuda::visible_gpus();
            match crate::backend::cuda::external::detect_from_env() {
                // One process per rank (torchrun, srun): the launcher's world size must be the
                // layout's, and this rank needs its GPU.
                Ok(Some(ext)) => {
                    for (field, message, fix) in ext.problems(world, gpus) {
                        c.fail(&field, message, &fix);
                    }
                }
                Err(e) => c.fail("run.backend", format!("launch environment: {}: {}", e.var, e.message), &e.fix),
                Ok(None) if gpus < world => {
                    c.fail("run.backend", format!("{CUDA_NEEDS_GPUS}: world={world} but {gpus} GPU(s) are visible"),
                        "use backend = \"cpu\" (or \"auto\"), or shrink the layout (dp*ep*tp*pp) to the GPUs present");
                }
                Ok(None) => {}
            }
        }
        BackendKind::Sim => {}
    }
    if r.backend == BackendKind::Cuda && spec.variant == Variant::Tutel && spec.layout.ep > spec.model.n_experts {
        c.fail("layout.ep", format!("tutel with ep={} > n_experts={} (experts split over ranks) runs on the cpu and sim backends only so far",
            spec.layout.ep, spec.model.n_experts), "use backend = \"cpu\" or \"sim\", or ep <= n_experts on cuda");
    }
    check_ppmoe(&mut c, &mut spec);
    // The sim backend's profile and cluster (and that only sim runs name them).
    c.problems.extend(crate::backend::sim::resolve_spec(&mut spec));

    if c.problems.is_empty() {
        Ok(spec)
    } else {
        Err(SpecError::Invalid { problems: c.problems, file: None })
    }
}

/// MPMoE rules: the `[mpmoe]` table belongs to variant "mpmoe" (which gets its defaults when
/// the table is absent), and the pipelining degree is between 1 and a bound.
fn check_mpmoe(c: &mut Checker, spec: &mut ExperimentSpec) {
    use super::MpmoeSpec;
    if spec.variant != Variant::Mpmoe {
        if spec.mpmoe.is_some() {
            c.fail("mpmoe", format!("the [mpmoe] table applies to variant \"mpmoe\" only (variant is {:?})", spec.variant.as_str()),
                "remove the [mpmoe] table, or set variant = \"mpmoe\"");
        }
        return;
    }
    let l = &spec.layout;
    if l.tp > 1 {
        c.fail("layout.tp", format!("variant mpmoe has no tensor parallelism (tp={})", l.tp),
            "set tp = 1, or use variant \"ted\" or \"ppmoe\" (tensor-parallel experts)");
    }
    if l.pp > 1 {
        c.fail("layout.pp", format!("variant mpmoe has no pipeline stages (pp={}); its pipeline is over chunks of one MoE layer", l.pp),
            "set pp = 1 and choose the pipelining degree with mpmoe.chunks");
    }
    let opts = spec.mpmoe.get_or_insert_with(MpmoeSpec::default);
    let tokens = spec.model.tokens_per_rank.filter(|t| *t > 0);
    let bound = tokens.map_or(MpmoeSpec::MAX_CHUNKS, |t| t.min(MpmoeSpec::MAX_CHUNKS));
    let chunks = match opts.chunks {
        super::Degree::Fixed(n) => n,
        super::Degree::Auto => 1,
    };
    if chunks == 0 {
        c.fail("mpmoe.chunks", "chunks=0 must be at least 1".into(),
            format!("set chunks between 1 and {bound} (1 = no pipelining), or chunks = \"auto\"; MPMoE's own search tries 2 to 8"));
    } else if chunks > MpmoeSpec::MAX_CHUNKS {
        c.fail("mpmoe.chunks", format!("chunks={chunks} exceeds the limit of {} chunks per MoE layer", MpmoeSpec::MAX_CHUNKS),
            format!("set chunks between 1 and {bound}, or chunks = \"auto\"; MPMoE's own search tries 2 to 8"));
    } else if let Some(t) = tokens.filter(|t| chunks > *t) {
        c.fail("mpmoe.chunks", format!("chunks={chunks} exceeds tokens_per_rank={t}: chunks would hold less than one token per rank"),
            format!("set chunks between 1 and {bound}, or give each rank more tokens"));
    }
    let auto = opts.chunks == super::Degree::Auto || opts.reuse == super::Reuse::Auto;
    match opts.memory_budget_mib {
        Some(b) if !(b.is_finite() && b > 0.0) => c.fail("mpmoe.memory_budget_mib", format!("memory_budget_mib={b} must be a positive number of MiB"),
            "set e.g. memory_budget_mib = 1024 (the largest predicted peak per rank the automatic choice may pick), or remove it"),
        Some(b) if !auto => c.fail("mpmoe.memory_budget_mib",
            format!("memory_budget_mib={b} only limits an automatic choice, but chunks and reuse are both fixed"),
            "set chunks = \"auto\" and/or reuse = \"auto\", or remove memory_budget_mib"),
        _ => {}
    }
}

/// ScMoE and DGMoE rules: the blocks they need (ScMoE: attention and a dense MLP; DGMoE:
/// attention), DGMoE's two top-1 gates (`top_k = 2` counts both), and no tp or pp.
fn check_shortcut(c: &mut Checker, spec: &ExperimentSpec) {
    let name = spec.variant.as_str();
    if !matches!(spec.variant, Variant::Scmoe | Variant::Dgmoe) {
        return;
    }
    let m = &spec.model;
    let (heads, d_mlp) = m.backbone.as_ref().map_or((0, 0), |bb| (bb.n_heads, bb.d_mlp));
    let missing = match (&m.backbone, heads, d_mlp) {
        (None, _, _) => "there is no [model.backbone]".to_string(),
        (Some(_), 0, 0) => "model.backbone has n_heads=0 and d_mlp=0".to_string(),
        (Some(_), 0, _) => "model.backbone has n_heads=0".to_string(),
        (Some(_), _, d) => format!("model.backbone has d_mlp={d}"),
    };
    // A head count that divides d_model, to suggest.
    let heads_hint = if heads > 0 { heads } else { [4, 2, 1].into_iter().find(|h| m.d_model.is_multiple_of(*h)).unwrap_or(1) };
    let mlp_hint = if d_mlp > 0 { d_mlp } else { m.d_ffn.max(1) };
    if spec.variant == Variant::Scmoe && (heads == 0 || d_mlp == 0) {
        c.fail("model.backbone",
            format!("variant scmoe needs attention and a dense MLP in every block (its all-to-alls overlap them), but {missing}"),
            format!("add [model.backbone] with n_heads = {heads_hint} and d_mlp = {mlp_hint} (both > 0; n_heads divides d_model), or use variant \"topk\""));
    }
    if spec.variant == Variant::Dgmoe {
        if heads == 0 {
            let missing = if m.backbone.is_none() { missing } else { "model.backbone has n_heads=0".to_string() };
            c.fail("model.backbone",
                format!("variant dgmoe needs attention in every block (the shortcut gate's all-to-all overlaps it), but {missing}"),
                format!("add [model.backbone] with n_heads = {heads_hint} (a divisor of d_model; d_mlp is optional), or use variant \"topk\""));
        }
        if m.top_k != 2 {
            c.fail("model.top_k",
                format!("variant dgmoe routes every token with two top-1 gates (one on the shortcut, one on the current representation), so top_k counts both and must be 2 (top_k={})", m.top_k),
                "set top_k = 2 (the default)");
        }
        if m.renormalize {
            c.fail("model.renormalize",
                "each dgmoe gate picks one expert, so renormalize = true would set every gate weight to 1 and leave the gates no gradient from the loss".into(),
                "set renormalize = false (the default)");
        }
    }
    let l = &spec.layout;
    if l.tp > 1 {
        c.fail("layout.tp", format!("variant {name} has no tensor parallelism (tp={})", l.tp),
            "set tp = 1, or use variant \"ted\" or \"ppmoe\" (tensor-parallel experts)");
    }
    if l.pp > 1 {
        c.fail("layout.pp", format!("variant {name} has no pipeline stages (pp={})", l.pp), "set pp = 1, or use variant \"ppmoe\"");
    }
}

/// Tutel rules: the `[tutel]` table belongs to variant "tutel" (which gets its defaults when
/// the table is absent), the degree is "auto" or between 1 and a bound, and the 2D all-to-all
/// needs `gpus_per_node` to divide the expert-parallel degree.
fn check_tutel(c: &mut Checker, spec: &mut ExperimentSpec) {
    use super::{A2aKind, Degree, TutelSpec};
    if spec.variant != Variant::Tutel {
        if spec.tutel.is_some() {
            c.fail("tutel", format!("the [tutel] table applies to variant \"tutel\" only (variant is {:?})", spec.variant.as_str()),
                "remove the [tutel] table, or set variant = \"tutel\"");
        }
        return;
    }
    let l = &spec.layout;
    if l.tp > 1 {
        c.fail("layout.tp", format!("variant tutel has no tensor parallelism in this build (tp={})", l.tp),
            "set tp = 1, or use variant \"ted\" or \"ppmoe\" (tensor-parallel experts)");
    }
    if l.pp > 1 {
        c.fail("layout.pp", format!("variant tutel has no pipeline stages (pp={}); its pipeline is over chunks of one MoE layer", l.pp),
            "set pp = 1 and choose the pipelining degree with tutel.degree");
    }
    let ep = l.ep;
    let opts = spec.tutel.get_or_insert_with(TutelSpec::default);
    let tokens = spec.model.tokens_per_rank.filter(|t| *t > 0);
    let bound = tokens.map_or(TutelSpec::MAX_DEGREE, |t| t.min(TutelSpec::MAX_DEGREE));
    match opts.degree {
        Degree::Fixed(0) => c.fail("tutel.degree", "degree=0 must be at least 1".into(),
            format!("set degree between 1 and {bound} (1 = no pipelining), or degree = \"auto\" to time 1, 2 and 4")),
        Degree::Fixed(d) if d > TutelSpec::MAX_DEGREE => c.fail("tutel.degree",
            format!("degree={d} exceeds the limit of {} chunks per MoE layer", TutelSpec::MAX_DEGREE),
            format!("set degree between 1 and {bound}, or degree = \"auto\"")),
        Degree::Fixed(d) if tokens.is_some_and(|t| d > t) => c.fail("tutel.degree",
            format!("degree={d} exceeds tokens_per_rank={}: chunks would hold less than one token per rank", tokens.unwrap_or(0)),
            format!("set degree between 1 and {bound}, or give each rank more tokens")),
        Degree::Auto if tokens.is_some_and(|t| t < 4) => c.fail("tutel.degree",
            format!("degree=\"auto\" tries 1, 2 and 4 chunks but tokens_per_rank={} is below 4", tokens.unwrap_or(0)),
            format!("set a fixed degree between 1 and {bound}, or give each rank at least 4 tokens")),
        _ => {}
    }
    let n_experts = spec.model.n_experts;
    let s = if n_experts > 0 && ep > n_experts && ep.is_multiple_of(n_experts) { ep / n_experts } else { 1 };
    check_tutel_layers(c, opts, spec.model.n_layers, s, tokens, bound);
    if s > 1 {
        check_tutel_sharded(c, opts, s, spec.model.d_ffn, ep, n_experts);
    } else if opts.r > 1 {
        c.fail("tutel.r", format!("r={} is not available: with every expert on one rank of its expert-parallel group (ep={ep} divides n_experts={n_experts}) only r = 0 and r = 1 exist", opts.r),
            "set r = 1 (expert parallel, all-to-all) or r = 0 (data parallel: all-gather the expert weights); r > 1 needs ep = s * n_experts with r dividing s");
    } else if opts.r == 0 && opts.degree != Degree::Fixed(1) {
        c.fail("tutel.degree", "r=0 runs every expert locally, so there is no all-to-all to pipeline (degree must be 1)".into(),
            "remove degree (or set degree = 1) with r = 0, or set r = 1 to pipeline the all-to-alls");
    }
    if opts.a2a == A2aKind::TwoD {
        let g = opts.gpus_per_node;
        if g == 0 {
            c.fail("tutel.gpus_per_node", "gpus_per_node=0 must be at least 1".into(),
                format!("set gpus_per_node to a divisor of layout.ep={ep}: {{{}}}", divisors(ep)));
        } else if ep > 0 && !ep.is_multiple_of(g) {
            c.fail("tutel.gpus_per_node",
                format!("gpus_per_node={g} does not divide layout.ep={ep}: the 2D all-to-all needs whole nodes in every expert-parallel group"),
                format!("choose gpus_per_node from {{{}}}, or set a2a = \"flat\"", divisors(ep)));
        }
    }
}

/// Per-layer choices (`tutel.layers`): one `{ r, degree }` per MoE layer, r in {0, 1} (every
/// expert on one rank), degree in 1..=bound and 1 when r = 0; not combined with `"auto"`.
fn check_tutel_layers(c: &mut Checker, opts: &super::TutelSpec, n_layers: usize, s: usize, tokens: Option<usize>, bound: usize) {
    use super::{Degree, ParallelismChoice};
    if opts.layers.is_empty() {
        return;
    }
    if opts.layers.len() != n_layers {
        c.fail("tutel.layers", format!("has {} entries but model.n_layers={n_layers}", opts.layers.len()),
            "give one { r, degree } per MoE layer, in layer order, or remove tutel.layers");
    }
    if opts.degree == Degree::Auto || opts.parallelism == ParallelismChoice::Auto {
        c.fail("tutel.layers", "fixed per-layer choices and degree/parallelism = \"auto\" exclude each other".into(),
            "remove tutel.layers to let \"auto\" choose per layer, or set degree and parallelism to fixed values");
    }
    if s > 1 {
        c.fail("tutel.layers", format!("per-layer choices need every expert on one rank, but experts are split over s = {s} ranks"),
            "remove tutel.layers, or set layout.ep <= model.n_experts");
        return;
    }
    for (i, l) in opts.layers.iter().enumerate() {
        if l.r > 1 {
            c.fail(&format!("tutel.layers[{i}].r"), format!("r={} is not available with every expert on one rank (only 0 and 1)", l.r),
                "set r = 1 (expert parallel) or r = 0 (data parallel)");
        }
        if l.degree == 0 || l.degree > bound || tokens.is_some_and(|t| l.degree > t) {
            c.fail(&format!("tutel.layers[{i}].degree"), format!("degree={} is outside 1..={bound}", l.degree),
                format!("set degree between 1 and {bound}"));
        } else if l.r == 0 && l.degree != 1 {
            c.fail(&format!("tutel.layers[{i}].degree"), format!("r=0 has no all-to-all to pipeline (degree={})", l.degree),
                "set degree = 1 for an r = 0 layer");
        }
    }
}

/// Tutel with an expert-parallel world above the experts (`ep = s * n_experts`, s > 1): every
/// expert is split over s ranks by hidden slices, so s divides `d_ffn`; r is a divisor of s
/// or 0 (data parallel: every member all-gathers every slice); no pipelining and the flat
/// all-to-all only.
fn check_tutel_sharded(c: &mut Checker, opts: &super::TutelSpec, s: usize, d_ffn: usize, ep: usize, n_experts: usize) {
    use super::{A2aKind, Degree, ParallelismChoice};
    let choices = format!("{{0, {}}}", divisors(s));
    if !d_ffn.is_multiple_of(s) {
        c.fail("model.d_ffn", format!("d_ffn={d_ffn} is not divisible by s = ep/n_experts = {ep}/{n_experts} = {s}: each of the s ranks of an expert holds d_ffn/s hidden units"),
            format!("choose d_ffn as a multiple of {s}, or another ep"));
    }
    if opts.parallelism == ParallelismChoice::Fixed {
        if opts.r > 0 && (opts.r > s || !s.is_multiple_of(opts.r)) {
            c.fail("tutel.r", format!("tutel.r={} does not divide s = W/E = {ep}/{n_experts} = {s}", opts.r),
                format!("choose r from {choices}: tokens travel r times, groups of s/r ranks all-gather their hidden slices (0: data parallel)"));
        }
    }
    if opts.degree != Degree::Fixed(1) {
        c.fail("tutel.degree", format!("pipelining is not built for ep={ep} > n_experts={n_experts} (experts split over {s} ranks)"),
            "remove degree (or set degree = 1)");
    }
    if opts.a2a == A2aKind::TwoD {
        c.fail("tutel.a2a", format!("the 2D all-to-all is not built for ep={ep} > n_experts={n_experts}"), "set a2a = \"flat\"");
    }
}

/// DeepSpeed-TED rules: the `[ted]` table belongs to variant "ted" (which gets its defaults
/// when the table is absent), tp divides the expert hidden size (fc1 and fc2 are sliced over
/// the TP group), and there are no pipeline stages.
fn check_ted(c: &mut Checker, spec: &mut ExperimentSpec) {
    use super::TedSpec;
    if spec.variant != Variant::Ted {
        if spec.ted.is_some() {
            c.fail("ted", format!("the [ted] table applies to variant \"ted\" only (variant is {:?})", spec.variant.as_str()),
                "remove the [ted] table, or set variant = \"ted\"");
        }
        return;
    }
    let (l, f) = (&spec.layout, spec.model.d_ffn);
    if l.tp > 0 && f > 0 && f % l.tp != 0 {
        c.fail("layout.tp", format!("tp={} does not divide d_ffn={f}: each expert's fc1 columns and fc2 rows are split over the TP group", l.tp),
            format!("choose tp from {{{}}}, or change model.d_ffn", divisors(f)));
    }
    if l.pp > 1 {
        c.fail("layout.pp", format!("variant ted has no pipeline stages (pp={})", l.pp), "set pp = 1, or use variant \"ppmoe\"");
    }
    spec.ted.get_or_insert_with(TedSpec::default);
}

/// PPMoE rules: the `[ppmoe]` table belongs to variant "ppmoe" (which gets its defaults when
/// the table is absent); the experts are spread over the tensor-parallel group (so ep = 1 and
/// tp divides n_experts); the backbone is split over it too (tp divides n_heads and d_mlp);
/// pp divides n_layers; and the micro-batches divide the batch.
fn check_ppmoe(c: &mut Checker, spec: &mut ExperimentSpec) {
    use super::PpmoeSpec;
    if spec.variant != Variant::Ppmoe {
        if spec.ppmoe.is_some() {
            c.fail("ppmoe", format!("the [ppmoe] table applies to variant \"ppmoe\" only (variant is {:?})", spec.variant.as_str()),
                "remove the [ppmoe] table, or set variant = \"ppmoe\"");
        }
        return;
    }
    let (l, m) = (&spec.layout, &spec.model);
    let e = m.n_experts;
    if l.ep > 1 {
        c.fail("layout.ep", format!("variant ppmoe places the experts on the tensor-parallel group, so there is no separate expert parallelism (ep={})", l.ep),
            format!("set ep = 1 and tp = {} (the experts are split over the TP ranks)", l.ep.saturating_mul(l.tp)));
    }
    if l.tp > 0 && e > 0 && e % l.tp != 0 {
        c.fail("layout.tp", format!("tp={} does not divide n_experts={e}: each TP rank owns n_experts/tp experts", l.tp),
            format!("choose tp from {{{}}}", divisors(e)));
    }
    if let (Some(bb), true) = (&m.backbone, l.tp > 1) {
        if bb.n_heads > 0 && bb.n_heads % l.tp != 0 {
            c.fail("layout.tp", format!("layout.tp={} does not divide model.backbone.n_heads={}: attention is split by heads over the TP group", l.tp, bb.n_heads),
                format!("choose tp from the common divisors of n_heads and n_experts (divisors of n_heads: {{{}}}), or change model.backbone.n_heads", divisors(bb.n_heads)));
        }
        if bb.d_mlp > 0 && bb.d_mlp % l.tp != 0 {
            c.fail("layout.tp", format!("layout.tp={} does not divide model.backbone.d_mlp={}: the dense MLP's fc1 columns and fc2 rows are split over the TP group", l.tp, bb.d_mlp),
                format!("choose tp from {{{}}}, or change model.backbone.d_mlp", divisors(bb.d_mlp)));
        }
    }
    if l.pp > 0 && m.n_layers > 0 && m.n_layers % l.pp != 0 {
        c.fail("layout.pp", format!("layout.pp={} does not divide model.n_layers={}: each pipeline stage holds n_layers/pp consecutive blocks", l.pp, m.n_layers),
            format!("choose pp from {{{}}}, or change model.n_layers", divisors(m.n_layers)));
    }
    let pp = l.pp.max(1);
    let batch = m.batch.filter(|b| *b > 0);
    let opts = spec.ppmoe.get_or_insert_with(PpmoeSpec::default);
    match (opts.micro_batches, batch) {
        (Some(0), _) => c.fail("ppmoe.micro_batches", "micro_batches=0 must be at least 1".into(),
            format!("set micro_batches to a divisor of model.batch{}", batch.map_or(String::new(), |b| format!("={b}: {{{}}}", divisors(b))))),
        (Some(n), Some(b)) if b % n != 0 => c.fail("ppmoe.micro_batches",
            format!("ppmoe.micro_batches={n} does not divide model.batch={b}: each micro-batch holds batch/micro_batches whole sequences"),
            format!("choose micro_batches from {{{}}}, or change model.batch", divisors(b))),
        (None, Some(b)) => opts.micro_batches = Some((1..=b).find(|d| b % d == 0 && *d >= pp).unwrap_or(b)),
        (None, None) => opts.micro_batches = Some(1),
        _ => {}
    }
}
