//! The cuda executor's kernels (plan_ops.cu, bench_ops.cu, route_ops.cu: one NVRTC unit)
//! compile for every architecture the backend targets and export every kernel it loads.
//! Needs only libnvrtc, no GPU (scripts/test installs NVIDIA's nvrtc wheel from PyPI); without
//! it the test prints why it skipped and passes.

use moelab::backend::cuda::gpu::{KERNELS, PLAN_KERNEL_SOURCE};
use moelab_kernels::device::require_nvrtc;
use moelab_kernels::nvrtc::{compile_extra, PtxCache};

#[test]
fn plan_kernels_compile_for_turing_ampere_and_hopper_and_export_every_listed_kernel() {
    if let Err(e) = require_nvrtc() {
        println!("skipped: no NVRTC ({e})");
        return;
    }
    for arch in ["compute_75", "compute_80", "compute_90"] {
        let ptx = compile_extra("plan_ops.cu", PLAN_KERNEL_SOURCE, arch, &PtxCache::disabled()).unwrap_or_else(|e| panic!("{arch}: {e}"));
        for k in KERNELS {
            assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing from the {arch} PTX");
        }
        // sm_80 and later convert f32 to bf16 in one instruction; older parts take the
        // integer rounding rule of common.cuh.
        let hardware_cvt = ptx.contains("cvt.rn.bf16x2.f32") && ptx.contains("cvt.rn.bf16.f32");
        assert_eq!(hardware_cvt, arch != "compute_75", "{arch}: bf16 conversion path");
        println!("{arch}: {} bytes of PTX, {} kernels", ptx.len(), KERNELS.len());
    }
}
