//! The declared MSRV (`rust-version` in Cargo.toml) holds for every dependency in the
//! lock file: none declares a newer one. `scripts/msrv` also runs clippy's
//! `incompatible_msrv` lint over the code.

use std::process::Command;

fn version(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn no_dependency_needs_a_newer_rust_than_declared() {
    let declared = env!("CARGO_PKG_RUST_VERSION");
    assert!(!declared.is_empty(), "Cargo.toml declares rust-version");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut newer = Vec::new();
    let mut checked = 0;
    for package in metadata["packages"].as_array().unwrap() {
        if let Some(needs) = package["rust_version"].as_str() {
            checked += 1;
            if version(needs) > version(declared) {
                newer.push(format!(
                    "{} {} needs {needs}",
                    package["name"], package["version"]
                ));
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} packages declare a rust-version"
    );
    assert!(newer.is_empty(), "MSRV {declared}, but: {newer:#?}");
}
