//! The layout stays readable: no import cycle between the modules of `src/`,
//! and no file grows past what a reader can hold.
//!
//! A cycle shows a misplaced type (`slot` importing `cli`, `event` and `odoo`
//! importing each other): each concept should sit below everything that uses
//! it. The graph counts every `crate::` and `super::` path outside
//! `#[cfg(test)]` items, in code and in doc comments (a doc link is a reference
//! a reader follows), and resolves each to the deepest module it names. A
//! module's declaration of its children (`mod x;`, `pub use x::…`) is not an
//! edge: parent and child are one unit.
//!
//! Runs without services: it reads the source files only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`session::publisher`) → file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, src, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src/")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                // The crate roots: `crate:main` so they never match a path.
                parts = vec![format!("crate:{}", parts[0])];
            }
            out.insert(parts.join("::"), path);
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The text outside `#[cfg(test)]` items, without plain `//` comments (doc
/// comments stay).
fn production_text(source: &str) -> String {
    let mut text = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("#[cfg(test)]") {
        text.push_str(&rest[..at]);
        let after = &rest[at..];
        let brace = after.find('{');
        let semi = after.find(';');
        match (brace, semi) {
            (Some(b), Some(s)) if s < b => rest = &after[s + 1..],
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (i, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[end..];
            }
            _ => rest = "",
        }
    }
    text.push_str(rest);
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("///") || trimmed.starts_with("//!") {
                return line;
            }
            // A comment starts at `//` at the line's start or after a space
            // (`postgres://` inside a string is not one).
            match line.find(" //").or(trimmed.starts_with("//").then_some(0)) {
                Some(i) => &line[..i],
                None => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `crate::…` / `super::…` path in `text`, `use` groups expanded.
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != ':';
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        if starts_word && (rest.starts_with("crate::") || rest.starts_with("super::")) {
            let (found, end) = parse_path(&bytes, i, Vec::new());
            out.extend(found);
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses `a::b::{c, d::e}` from `at`; returns the expanded paths and where
/// parsing stopped.
fn parse_path(s: &[char], mut at: usize, prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix;
    loop {
        let start = at;
        while at < s.len() && is_ident(s[at]) {
            at += 1;
        }
        if at > start {
            path.push(s[start..at].iter().collect());
        }
        if at + 1 < s.len() && s[at] == ':' && s[at + 1] == ':' {
            at += 2;
            if at < s.len() && s[at] == '{' {
                at += 1;
                let mut all = Vec::new();
                loop {
                    while at < s.len() && (s[at].is_whitespace() || s[at] == ',') {
                        at += 1;
                    }
                    if at >= s.len() || s[at] == '}' {
                        return (all, at + 1);
                    }
                    let (found, end) = parse_path(s, at, path.clone());
                    all.extend(found);
                    // Skip `as name` and anything up to the next item.
                    at = end;
                    while at < s.len() && s[at] != ',' && s[at] != '}' {
                        at += 1;
                    }
                }
            }
            continue;
        }
        return (vec![path], at);
    }
}

/// The module an absolute or relative path resolves to, from module `from`.
fn resolve(path: &[String], from: &str, mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut abs: Vec<String> = if from.starts_with("crate:") {
        Vec::new()
    } else {
        from.split("::").map(str::to_string).collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            abs.clear();
            rest = &rest[1..];
        }
        Some("super") => {
            while rest.first().is_some_and(|p| p == "super") {
                abs.pop();
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    abs.extend(rest.iter().cloned());
    (1..=abs.len())
        .rev()
        .map(|n| abs[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut edges = BTreeMap::new();
    for (name, file) in &mods {
        let text = production_text(&std::fs::read_to_string(file).expect("read source"));
        let targets: BTreeSet<String> = paths(&text)
            .iter()
            .filter_map(|p| resolve(p, name, &mods))
            .filter(|t| t != name)
            .collect();
        edges.insert(name.clone(), targets);
    }
    edges
}

/// A cycle through `start`, if there is one: the modules in order.
fn cycle_through(start: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, trail)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = trail.clone();
                cycle.push(start.to_string());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut t = trail.clone();
                t.push(next.clone());
                stack.push((next.clone(), t));
            }
        }
    }
    None
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_import_cycle_between_modules() {
    let edges = graph(&src_dir());
    assert!(edges.contains_key("session::publisher"), "{edges:?}");
    let cycles: BTreeSet<String> = edges
        .keys()
        .filter_map(|m| cycle_through(m, &edges))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles between src/ modules (move the type below both):\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// The checker sees what it should: a group import, a relative path, a doc
/// link, and nothing from a test module or a plain comment.
#[test]
fn the_checker_reads_groups_relative_paths_and_skips_tests() {
    let text = production_text(
        "use crate::{a::B, c::{d, e::F}};\nuse super::g::H;\n/// See [`crate::docs`].\n\
         // crate::plain_comment\nlet u = \"postgres://x\"; crate::code::f();\n\
         #[cfg(test)]\nmod tests { use crate::only_tests; }\n",
    );
    let found: Vec<String> = paths(&text).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "crate::a::B",
            "crate::c::d",
            "crate::c::e::F",
            "super::g::H",
            "crate::docs",
            "crate::code::f"
        ]
    );
}

/// Lines of code before a file's `#[cfg(test)]` module.
fn code_lines(file: &Path) -> usize {
    let text = std::fs::read_to_string(file).expect("read source");
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .count()
}

/// Big files hide structure. The pgoutput decoder and the value mapping are
/// long lists of message and type cases, read one case at a time.
#[test]
fn no_source_file_is_too_long_to_read() {
    const LIMIT: usize = 820;
    let exempt = ["pgoutput", "value"];
    let long: Vec<String> = modules(&src_dir())
        .iter()
        .filter(|(name, _)| !exempt.contains(&name.as_str()))
        .map(|(name, file)| (name, code_lines(file)))
        .filter(|(_, n)| *n > LIMIT)
        .map(|(name, n)| format!("{name}: {n} lines of code"))
        .collect();
    assert!(
        long.is_empty(),
        "split these by concept (limit {LIMIT}):\n{}",
        long.join("\n")
    );
}
