//! Temporary directories for test servers and files.

use std::path::PathBuf;

/// A fresh temporary directory (the caller removes it, or hands it to a [`ServerProcess`]).
pub fn temp_dir(name: &str) -> PathBuf {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    let dir = std::env::temp_dir().join(format!(
        "tokenfan-{name}-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(bytes)
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir
}
