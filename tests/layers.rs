//! The house rule: modules import only from their own room or the rooms below it, and no module
//! import loop exists (docs/design.md §0). Reads every `src/**/*.rs` file; no compilation needed
//! beyond this test. Run alone with `cargo test --test layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The rooms, lowest first: a module may import from its own room and the rooms before it.
const ROOMS: [&str; 6] = ["foundation", "math", "repr", "format", "methods", "app"];

fn rank(room: &str) -> Option<usize> {
    ROOMS.iter().position(|r| *r == room)
}

/// One source file: its module path and its text.
struct Source {
    module: Vec<String>,
    text: String,
    is_mod_rs: bool,
}

/// The module path of `file` relative to `src/` (`methods/fips/mod.rs` → `methods::fips`).
fn module_of(rel: &Path) -> (Vec<String>, bool) {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let is_mod_rs = file == "mod.rs";
    if parts.is_empty() && file == "lib.rs" {
        return (Vec::new(), true); // the crate root
    }
    if !is_mod_rs {
        parts.push(file.trim_end_matches(".rs").to_string());
    }
    (parts, is_mod_rs)
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src");
            let (module, is_mod_rs) = module_of(rel);
            let text = std::fs::read_to_string(&path).expect("readable source");
            out.push(Source {
                module,
                text,
                is_mod_rs,
            });
        }
    }
}

/// The code of `text` without comments (line comments and doc comments).
fn code_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => line[..i].to_string(),
            None => line.to_string(),
        })
        .collect()
}

/// The identifier path starting at byte `start` of `line` (`a::b::C`).
fn path_at(line: &str, start: usize) -> Vec<String> {
    let rest = &line[start..];
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Violations of the rule and the module graph, for sources given as (module path, text).
struct Analysis {
    problems: Vec<String>,
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn analyse(sources: &[Source]) -> Analysis {
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    let resolve = |path: &[String]| -> Option<Vec<String>> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| modules.contains(p))
    };
    let mut problems = Vec::new();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for src in sources {
        if src.module.is_empty() || src.module[0] == "bin" {
            continue; // the crate root (a facade of re-exports) and the binary (uses `fips::`)
        }
        let name = src.module.join("::");
        let own = rank(&src.module[0]);
        if own.is_none() {
            problems.push(format!("{name}: not in a room ({})", ROOMS.join(", ")));
            continue;
        }
        let mut in_tests = false;
        for (n, line) in code_lines(&src.text).iter().enumerate() {
            if line.contains("#[cfg(test)]") {
                in_tests = true;
            }
            let mut targets = Vec::new();
            for (i, _) in line.match_indices("crate::") {
                if line[..i].ends_with('$') {
                    // `$crate::…` in a macro: a path to the macro's own module.
                    targets.push(path_at(line, i + "crate::".len()));
                    continue;
                }
                if line[i..].starts_with("crate::{") {
                    problems.push(format!(
                        "{name}:{}: group `use crate::` imports by room path, one per line",
                        n + 1
                    ));
                    continue;
                }
                targets.push(path_at(line, i + "crate::".len()));
            }
            if !in_tests {
                for (i, _) in line.match_indices("super::") {
                    if line[..i].ends_with("crate::") || line[i..].starts_with("super::*") {
                        continue;
                    }
                    let mut base = src.module.clone();
                    if !src.is_mod_rs {
                        base.pop();
                    }
                    base.pop();
                    base.extend(path_at(line, i + "super::".len()));
                    targets.push(base);
                }
                // A parent module's relative imports of its children.
                let trimmed = line.trim_start();
                let relative = trimmed
                    .strip_prefix("pub use ")
                    .or_else(|| trimmed.strip_prefix("use "));
                if let Some(rest) = relative
                    && src.is_mod_rs
                {
                    let first = path_at(rest, 0);
                    if let Some(child) = first.first() {
                        let mut path = src.module.clone();
                        path.push(child.clone());
                        if modules.contains(&path) {
                            let mut full = src.module.clone();
                            full.extend(first);
                            targets.push(full);
                        }
                    }
                }
            }
            for target in targets {
                let Some(first) = target.first() else {
                    continue;
                };
                let Some(theirs) = rank(first) else {
                    problems.push(format!(
                        "{name}:{}: `crate::{}` is not a room path (import from a room, not the crate root)",
                        n + 1,
                        target.join("::")
                    ));
                    continue;
                };
                if own.is_some_and(|own| theirs > own) {
                    problems.push(format!(
                        "{name}:{}: imports `{}` from the higher room `{first}`",
                        n + 1,
                        target.join("::")
                    ));
                }
                if let Some(module) = resolve(&target)
                    && module != src.module
                {
                    edges.entry(src.module.clone()).or_default().insert(module);
                }
            }
        }
    }
    // Cycles: depth-first search with colours.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        problems: &mut Vec<String>,
    ) {
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                0 => visit(next, edges, state, stack, problems),
                1 => {
                    let from = stack.iter().position(|m| m == next).unwrap_or(0);
                    let cycle: Vec<String> = stack[from..]
                        .iter()
                        .chain(std::iter::once(next))
                        .map(|m| m.join("::"))
                        .collect();
                    problems.push(format!("import loop: {}", cycle.join(" -> ")));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node).copied().unwrap_or(0) == 0 {
            visit(node, &edges, &mut state, &mut Vec::new(), &mut problems);
        }
    }
    Analysis { problems, edges }
}

fn source(module: &str, text: &str) -> Source {
    let is_mod_rs = text.contains("mod ");
    Source {
        module: module.split("::").map(str::to_string).collect(),
        text: text.to_string(),
        is_mod_rs,
    }
}

#[test]
fn the_checker_finds_upward_imports_loops_and_root_paths() {
    let ok = analyse(&[
        source("math::a", "use crate::foundation::x::Y;\n"),
        source("foundation::x", "pub struct Y;\n"),
    ]);
    assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    assert_eq!(ok.edges.len(), 1);

    let upward = analyse(&[
        source("math::a", "use crate::methods::m::M;\n"),
        source("methods::m", "pub struct M;\n"),
    ]);
    assert!(
        upward.problems[0].contains("higher room"),
        "{:?}",
        upward.problems
    );

    let looped = analyse(&[
        source("methods::a", "use crate::methods::b::B;\npub struct A;\n"),
        source(
            "methods::b",
            "fn f(_: crate::methods::a::A) {}\npub struct B;\n",
        ),
    ]);
    assert!(
        looped.problems.iter().any(|p| p.contains("import loop")),
        "{:?}",
        looped.problems
    );

    let root = analyse(&[source("math::a", "use crate::FipsError;\n")]);
    assert!(
        root.problems[0].contains("not a room path"),
        "{:?}",
        root.problems
    );

    // Comments and doc links do not count.
    let docs = analyse(&[source("math::a", "//! See [`x`](crate::app::pipeline).\n")]);
    assert!(docs.problems.is_empty(), "{:?}", docs.problems);
}

#[test]
fn no_module_imports_from_a_higher_room_and_no_import_loop_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = Vec::new();
    collect(&root, &root, &mut sources);
    assert!(sources.len() > 20, "found {} sources", sources.len());
    let analysis = analyse(&sources);
    assert!(
        analysis.problems.is_empty(),
        "layering violations:\n{}",
        analysis.problems.join("\n")
    );
    for room in ROOMS {
        assert!(
            root.join(room).join("mod.rs").is_file(),
            "room {room} has no src/{room}/mod.rs"
        );
    }
}

#[test]
fn the_application_room_is_compiled_only_with_its_feature() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let lines: Vec<&str> = lib.lines().map(str::trim).collect();
    let at = lines
        .iter()
        .position(|l| *l == "pub mod app;")
        .expect("lib.rs declares the app room");
    assert!(
        lines[..at]
            .iter()
            .rev()
            .take(3)
            .any(|l| *l == "#[cfg(feature = \"app\")]"),
        "`pub mod app;` must be gated by #[cfg(feature = \"app\")]"
    );
}
