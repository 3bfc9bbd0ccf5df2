//! The module layering the README promises, checked on the source: domain modules
//! (`trips`, `dispatch`, `events`) speak no gRPC, and no two top-level modules import
//! each other, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its non-test code names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_str().unwrap().trim_end_matches(".rs").to_string();
            if ["lib", "main", "pb"].contains(&top.as_str()) || rel.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let deps = out.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + 7..];
                let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    group[..group.find('}').unwrap_or(0)].split(',').map(|s| s.trim()).collect()
                } else {
                    vec![rest]
                };
                for n in names {
                    let m: String = n.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if !m.is_empty() && m != top && m != "pb" {
                        deps.insert(m);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn domain_modules_speak_no_grpc() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for f in ["trips/mod.rs", "trips/actor.rs", "trips/model.rs", "trips/share.rs", "dispatch.rs", "events.rs"] {
        let text = std::fs::read_to_string(src.join(f)).unwrap();
        for banned in ["tonic", "crate::api", "crate::pb", "use crate::{"] {
            assert!(!text.contains(banned), "{f} mentions {banned}: domain code converts nothing to or from gRPC");
        }
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let g = imports();
    // A path from `to` back to `from` closes a cycle.
    let reaches = |from: &str, to: &str| -> Option<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![vec![from.to_string()]];
        while let Some(path) = stack.pop() {
            let last = path.last().unwrap().clone();
            if last == to && path.len() > 1 {
                return Some(path);
            }
            if !seen.insert(last.clone()) {
                continue;
            }
            for n in g.get(&last).into_iter().flatten() {
                let mut p = path.clone();
                p.push(n.clone());
                stack.push(p);
            }
        }
        None
    };
    for (m, deps) in &g {
        for d in deps {
            if let Some(back) = reaches(d, m) {
                panic!("import cycle: {m} -> {}", back.join(" -> "));
            }
        }
    }
}
