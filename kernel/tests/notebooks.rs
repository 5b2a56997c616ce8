//! Runs scripts/test-notebooks (jupyter_kernel_test conformance and every notebook in
//! notebooks/ through nbclient) with this build's kernel binary, so `cargo test` and CI run
//! the Python side too. Without python3 it skips with a message.

use std::process::Command;

#[test]
fn conformance_suite_and_every_notebook_pass_through_the_installed_kernelspec() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIPPED: python3 not found; the Jupyter conformance and notebook tests need it");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let status = Command::new("bash")
        .arg(root.join("scripts/test-notebooks"))
        .env("MOELAB_KERNEL_BIN", env!("CARGO_BIN_EXE_moelab-kernel"))
        .status()
        .expect("running scripts/test-notebooks");
    assert!(status.success(), "scripts/test-notebooks failed ({status}); its output is above");
}
