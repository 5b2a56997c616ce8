//! Compiles every kernel family with NVRTC for Turing, Ampere and Hopper (compute_75, 80 and
//! 90) and checks that each registered kernel is in the PTX. Needs only libnvrtc, no GPU: on a machine without it the
//! test prints why it skipped and passes.

use moelab_kernels::device::require_nvrtc;
use moelab_kernels::nvrtc::{compile_family, nvrtc_version, Family, PtxCache};

#[test]
fn every_family_compiles_for_turing_ampere_and_hopper_and_exports_its_kernels() {
    if let Err(e) = require_nvrtc() {
        println!("skipped: no NVRTC ({e})");
        return;
    }
    let (major, minor) = nvrtc_version().expect("nvrtc version");
    println!("nvrtc {major}.{minor}");
    for arch in ["compute_75", "compute_80", "compute_90"] {
        for family in Family::ALL {
            let (ptx, record) = compile_family(family, arch, &PtxCache::disabled())
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
            assert!(!record.cache_hit);
            for k in family.kernels() {
                assert!(ptx.contains(&format!(".entry {}(", k.name())), "{} missing from {} ({arch})", k.name(), family.file_name());
            }
            println!("{arch} {}: {} bytes of PTX in {:.0} ms", family.file_name(), ptx.len(), record.compile_ms);
        }
    }
}

#[test]
fn the_cache_round_trips() {
    if require_nvrtc().is_err() {
        println!("skipped: no NVRTC");
        return;
    }
    let dir = std::env::temp_dir().join(format!("moelab-ptx-test-{}", std::process::id()));
    let cache = PtxCache::at(&dir);
    let (first, r1) = compile_family(Family::Softmax, "compute_90", &cache).unwrap_or_else(|e| panic!("{e}"));
    assert!(!r1.cache_hit);
    assert!(r1.cache_error.is_none(), "{:?}", r1.cache_error);
    let (second, r2) = compile_family(Family::Softmax, "compute_90", &cache).unwrap_or_else(|e| panic!("{e}"));
    assert!(r2.cache_hit);
    assert_eq!(first, second);
    let _ = std::fs::remove_dir_all(&dir);
}
