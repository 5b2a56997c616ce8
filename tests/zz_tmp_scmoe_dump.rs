//! Temporary (scmoe engineer): dump topk plans to compare before/after a refactor.
mod common;
use common::*;
#[test]
fn dump() {
    let dir = std::env::var("DUMP_DIR").unwrap_or_else(|_| "/tmp/scmoe/plans".into());
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("a", "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", "dp = 2\nep = 2", ""),
        ("b", "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ndropless = true\n[model.backbone]\nn_heads = 2\nd_mlp = 20", "ep = 4", ""),
        ("c", "tokens_per_rank = 16\nn_layers = 3\ntop_k = 1", "", "mode = \"inference\""),
        ("d", "tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n[model.backbone]\nn_heads = 2\nd_mlp = 16", "ep = 2", ""),
    ];
    for (n, m, l, r) in cases {
        let s = spec(m, l, r);
        let p = moelab::plan::Plan::build(&s).unwrap();
        std::fs::write(format!("{dir}/{n}.json"), serde_json::to_string_pretty(&p).unwrap()).unwrap();
    }
}
