//! Writes the seed corpus to `seeds/<target>/<name>` (next to this crate's Cargo.toml).
//!
//! `cargo run --example gen_seeds` rewrites the files; `cargo run --example gen_seeds -- --check`
//! only compares them and exits 1 when a file is missing, differs, or is not generated.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let seeds = switchboard_protocol_fuzz::seeds::all();
    let mut expected: BTreeSet<PathBuf> = BTreeSet::new();
    let mut stale = Vec::new();
    for seed in &seeds {
        let dir = root.join(seed.target);
        let path = dir.join(seed.name);
        assert!(expected.insert(path.clone()), "duplicate seed {}", path.display());
        let current = std::fs::read(&path).ok();
        if current.as_deref() == Some(&seed.bytes[..]) {
            continue;
        }
        if check {
            stale.push(path);
        } else {
            std::fs::create_dir_all(&dir).expect("create the seed folder");
            std::fs::write(&path, &seed.bytes).expect("write a seed");
            println!("wrote {}", path.display());
        }
    }
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            if !expected.contains(&file.path()) {
                println!(
                    "not generated (remove it or add it to src/seeds.rs): {}",
                    file.path().display()
                );
                stale.push(file.path());
            }
        }
    }
    if check && !stale.is_empty() {
        for path in &stale {
            println!("stale: {}", path.display());
        }
        return ExitCode::FAILURE;
    }
    println!("{} seeds in {}", seeds.len(), root.display());
    ExitCode::SUCCESS
}
