//! The engine's modules form layers: no import cycle between its top-level modules
//! (`ingress`, `shard`, `lifecycle`, `journal`, `ops`, `switch`, …). This reads the
//! sources and fails naming the cycle, so a new `use` that ties two stages together is
//! caught in review rather than found later in a tangle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/shard/duplicates.rs` → `shard`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// `crate::NAME` mentioned in code (not comments), before the file's tests.
fn dependencies(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for dep in dependencies(&text) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    graph
}

/// A path from `from` back to itself, if there is one.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in graph.get(last).into_iter().flatten() {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn the_engines_modules_have_no_import_cycle() {
    let graph = graph();
    assert!(
        graph.contains_key("lifecycle") && graph.contains_key("switch"),
        "the sources were found: {:?}",
        graph.keys()
    );
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_pure_stages_use_neither_the_switch_nor_ops() {
    let graph = graph();
    for pure in [
        "ingress",
        "shard",
        "lifecycle",
        "recovery",
        "routing",
        "scoring",
    ] {
        let deps = &graph[pure];
        for io in ["switch", "ops", "sim"] {
            assert!(!deps.contains(io), "{pure} uses {io}: {deps:?}");
        }
    }
}

#[test]
fn a_cycle_would_be_found() {
    let mut graph = graph();
    graph
        .get_mut("routing")
        .unwrap()
        .insert("switch".to_string());
    assert!(cycle_from(&graph, "routing").is_some());
}
