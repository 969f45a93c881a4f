//! The Python interpreter of the tests that check against Python tools: `PYTHON` when set
//! (`scripts/test` sets it), else the project's virtual environment `.venv` (where
//! `scripts/test` installs the pinned tools), else `python3` from PATH.

use std::path::{Path, PathBuf};

/// The interpreter to run.
pub fn interpreter() -> PathBuf {
    if let Some(python) = std::env::var_os("PYTHON").filter(|p| !p.is_empty()) {
        return python.into();
    }
    // The workspace root is the parent of every crate's directory.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}
