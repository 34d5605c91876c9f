//! The crate's module import graph: imports run one way between the layers `src/lib.rs` lists, and
//! no modules import each other in a loop.
//!
//! Print the graph (one line per module: the modules it imports) with
//!
//!     cargo test --test layers -- --nocapture
//!
//! A module is a file of src/ (a `mod.rs` is its directory); the binaries (main.rs, bin/) sit on
//! top of everything and are not counted. An edge a -> b is any `crate::...` or `super::...` path
//! in a's code (not its comments, not its `#[cfg(test)]` module) that names module b or an item
//! of it. A module's own submodules are its parts, so importing them is not an edge; a submodule
//! importing from its parent is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

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

/// `a::b::c` for src/a/b/c.rs and src/a/b/c/mod.rs; None for lib.rs and the binaries.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.first().map(String::as_str) {
        None | Some("lib") | Some("main") | Some("bin") => None,
        _ => Some(parts.join("::")),
    }
}

/// The code of a file without comments and without its test module.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap();
    (text.lines())
        .map(|l| l.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a piece of code names from `crate::` or `super::`, each as its list of segments
/// (one level of `{a, b::c}` groups expanded), with `super` resolved against module `m`.
fn paths_in(code: &str, m: &str) -> Vec<Vec<String>> {
    let parent: Vec<&str> = m.split("::").collect::<Vec<_>>()[..m.split("::").count() - 1].to_vec();
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for root in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(root) {
            let start = from + at;
            from = start + root.len();
            if start > 0 && (is_ident(bytes[start - 1] as char) || bytes[start - 1] == b':') {
                continue; // part of a longer path or name (e.g. `super::super::`, `sqlora::crate`)
            }
            // Segments after the root, then an optional `{...}` group.
            let mut segs: Vec<String> = if root == "crate::" {
                vec![]
            } else {
                parent.iter().map(|s| s.to_string()).collect()
            };
            let mut rest = &code[from..];
            while let Some(seg) = rest.strip_prefix("super::") {
                segs.pop();
                rest = seg;
            }
            loop {
                let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
                if len == 0 {
                    break;
                }
                segs.push(rest[..len].to_string());
                rest = &rest[len..];
                match rest.strip_prefix("::") {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let item = item.trim().split(' ').next().unwrap_or("");
                    let mut p = segs.clone();
                    p.extend(
                        item.split("::")
                            .filter(|s| !s.is_empty() && *s != "self")
                            .map(String::from),
                    );
                    out.push(p);
                }
            }
            out.push(segs);
        }
    }
    out
}

/// The module graph of src/.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = (files.iter())
        .filter_map(|f| module_of(src, f).map(|m| (m, f.clone())))
        .collect();
    let mut g = Graph::new();
    for (m, file) in &modules {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = g.entry(m.clone()).or_default();
        for path in paths_in(&code, m) {
            // The longest prefix of the path that is a module.
            let Some(target) = (1..=path.len())
                .rev()
                .map(|k| path[..k].join("::"))
                .find(|p| modules.contains_key(p))
            else {
                continue;
            };
            let own_part = target.starts_with(&format!("{m}::"));
            if target != *m && !own_part {
                edges.insert(target);
            }
        }
    }
    g
}

/// The modules on a loop of imports, if any (one strongly connected component with two or more).
fn loops(g: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: finishing order on g, then components on the reversed graph.
    fn visit<'a>(g: &'a Graph, v: &'a str, seen: &mut BTreeSet<&'a str>, order: &mut Vec<&'a str>) {
        if seen.insert(v) {
            for w in &g[v] {
                visit(g, w, seen, order);
            }
            order.push(v);
        }
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for v in g.keys() {
        visit(g, v, &mut seen, &mut order);
    }
    let mut rev: Graph = g.keys().map(|k| (k.clone(), BTreeSet::new())).collect();
    for (a, bs) in g {
        for b in bs {
            rev.get_mut(b).unwrap().insert(a.clone());
        }
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for v in order.into_iter().rev() {
        let mut comp = Vec::new();
        visit(&rev, v, &mut done, &mut comp);
        if comp.len() > 1 {
            comp.sort();
            out.push(comp.into_iter().map(String::from).collect());
        }
    }
    out
}

/// The layers `src/lib.rs` declares, lowest first (its line `//! layers: a < b < ...`).
fn declared_layers(lib: &str) -> Vec<String> {
    let line = (lib.lines())
        .find_map(|l| l.strip_prefix("//! layers:"))
        .expect("src/lib.rs has a line `//! layers: a < b < ...`");
    line.split('<').map(|s| s.trim().to_string()).collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn imports_run_one_way_between_the_layers_lib_rs_declares() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let layers = declared_layers(&lib);
    let declared: BTreeSet<&str> = (lib.lines())
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        declared,
        layers.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "src/lib.rs declares these top-level modules, and its layers line must name each once"
    );
    let rank = |m: &str| layers.iter().position(|l| l == m.split("::").next().unwrap()).unwrap();
    let g = graph(&src());
    println!("layers, lowest first: {}", layers.join(" < "));
    let mut upward = Vec::new();
    for (m, edges) in &g {
        let names: Vec<&str> = edges.iter().map(String::as_str).collect();
        println!(
            "{m}: {}",
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(", ")
            }
        );
        for e in edges {
            if rank(e) > rank(m) {
                upward.push(format!("{m} -> {e}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports from a later layer: {upward:#?}");
}

#[test]
fn no_modules_import_each_other_in_a_loop() {
    let g = graph(&src());
    assert!(g.len() > 40, "the graph has every module of src/ ({} found)", g.len());
    assert_eq!(
        loops(&g),
        Vec::<Vec<String>>::new(),
        "modules that import each other in a loop"
    );
}

#[test]
fn the_checker_sees_loops_upward_edges_groups_and_super() {
    // A small tree written to a temporary src/: a <-> b through a group and `super`, c below a.
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path();
    std::fs::create_dir_all(s.join("a")).unwrap();
    std::fs::write(s.join("lib.rs"), "//! layers: c < a\npub mod a;\npub mod c;\n").unwrap();
    std::fs::write(s.join("a/mod.rs"), "pub mod b;\nuse crate::c::{self, x::Y};\n").unwrap();
    std::fs::write(
        s.join("a/b.rs"),
        "use super::Thing; // crate::c in a comment is not an edge\n",
    )
    .unwrap();
    std::fs::write(s.join("a/d.rs"), "fn f() { super::super::c::g() }\n").unwrap();
    std::fs::write(
        s.join("c.rs"),
        "pub mod x;\nfn f() { crate::a::b::h() }\n#[cfg(test)]\nmod t { use crate::a::Q; }\n",
    )
    .unwrap();
    std::fs::create_dir_all(s.join("c")).unwrap();
    std::fs::write(s.join("c/x.rs"), "").unwrap();
    let g = graph(s);
    let edges = |m: &str| g[m].iter().map(String::as_str).collect::<Vec<_>>();
    assert_eq!(edges("a"), vec!["c", "c::x"]);
    assert_eq!(edges("a::b"), vec!["a"]);
    assert_eq!(edges("a::d"), vec!["c"]);
    assert_eq!(edges("c"), vec!["a::b"]);
    assert_eq!(loops(&g), vec![vec!["a".to_string(), "a::b".into(), "c".into()]]);
    assert_eq!(declared_layers("//! layers: c < a\n"), vec!["c", "a"]);
}
