//! The layering rule of ARCHITECTURE.md, checked: a module may use modules of its own layer or
//! of layers below it, never above, and modules of one layer do not form a cycle. The check
//! reads `src/` (every `crate::` path outside comments and `#[cfg(test)]` modules) and needs no
//! tool beyond this test, so `cargo test` (and so `scripts/test.sh`) fails on a new upward import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. Submodules belong to their parent's layer unless listed themselves.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "wire formats and tools",
        &[
            "ws",
            "protocol",
            "metrics",
            "origin",
            "systemd",
            "query",
            "client_tls",
            "server_cert",
        ],
    ),
    ("configuration", &["config"]),
    ("policy", &["admission", "auth"]),
    ("topics and delivery", &["hub"]),
    (
        "client session",
        &["session", "transport::longpoll::registry"],
    ),
    (
        "brokers and services",
        &[
            "broker",
            "broker::redis",
            "presence",
            "forward",
            "challenges",
        ],
    ),
    ("context", &["app"]),
    (
        "transports and HTTP",
        &[
            "respond",
            "conn",
            "listener",
            "transport",
            "transport::websocket",
            "transport::longpoll",
            "http1",
            "api",
            "router",
            "deadline",
            "acme",
            "proxy_protocol",
            "tls",
        ],
    ),
    ("server", &["server", "lib", "fuzzing"]),
];

/// Upward or cyclic edges that exist today and are being removed (issue 21). The test fails
/// when an edge not listed here breaks the rule, and when a listed edge is gone (so the list
/// only shrinks).
const KNOWN: &[&str] = &[];

fn layer_of(module: &str) -> Option<(usize, String)> {
    // The longest listed prefix decides: `broker::redis::x` is `broker::redis`.
    let mut best: Option<(usize, String)> = None;
    for (i, (_, mods)) in LAYERS.iter().enumerate() {
        for m in *mods {
            let matches = module == *m || module.starts_with(&format!("{m}::"));
            if matches && best.as_ref().is_none_or(|(_, b)| m.len() > b.len()) {
                best = Some((i, m.to_string()));
            }
        }
    }
    best
}

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

/// `src/broker/redis.rs` -> `broker::redis`, `src/hub/mod.rs` -> `hub`, `src/lib.rs` -> `lib`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") && parts.len() > 1 {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without comments and without `#[cfg(test)]` modules (unit tests may
/// reach anywhere).
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            // Skip the module: count braces from its opening line.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                if opened && depth <= 0 {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Every module path named after `crate::`, including each item of `crate::{a, b::c}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let preceded = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
        rest = &rest[i + "crate::".len()..];
        if preceded {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(j, _)| j)
                .unwrap_or(group.len());
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(path_head(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            found.push(path_head(rest));
        }
    }
    found.retain(|p| !p.is_empty());
    found
}

/// The leading `a::b::c` of `s` (identifiers and `::` only).
fn path_head(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_alphanumeric() || c == '_' {
            out.push(c);
            chars.next();
        } else if c == ':' {
            let mut ahead = chars.clone();
            ahead.next();
            if ahead.peek() == Some(&':') {
                chars.next();
                chars.next();
                if chars
                    .peek()
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_')
                {
                    out.push_str("::");
                    continue;
                }
            }
            break;
        } else {
            break;
        }
    }
    out
}

/// `module -> used` edges between listed modules (a module's own items excluded).
fn edges() -> BTreeSet<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = BTreeSet::new();
    let mut unplaced = Vec::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == "main" {
            continue; // the binary: the top, above every layer
        }
        let Some((_, from)) = layer_of(&module) else {
            unplaced.push(module);
            continue;
        };
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for path in crate_paths(&code) {
            if let Some((_, to)) = layer_of(&path)
                && to != from
                && !from.starts_with(&format!("{to}::"))
                && !to.starts_with(&format!("{from}::"))
            {
                edges.insert((from.clone(), to));
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "modules in no layer (place each in LAYERS in tests/layers.rs and in ARCHITECTURE.md): {unplaced:?}"
    );
    edges
}

/// Edges that break the rule: upward ones, and those in a cycle within one layer.
fn violations(edges: &BTreeSet<(String, String)>) -> BTreeSet<String> {
    let layer = |m: &str| layer_of(m).unwrap().0;
    let mut bad = BTreeSet::new();
    let mut same: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges {
        if layer(to) > layer(from) {
            bad.insert(format!("{from} -> {to}"));
        } else if layer(to) == layer(from) {
            same.entry(from).or_default().push(to);
        }
    }
    // An edge a -> b within a layer is cyclic when b reaches a.
    let reaches = |start: &str, goal: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start];
        while let Some(m) = stack.pop() {
            if m == goal {
                return true;
            }
            if seen.insert(m) {
                stack.extend(same.get(m).into_iter().flatten().copied());
            }
        }
        false
    };
    for (from, tos) in &same {
        for to in tos {
            if reaches(to, from) {
                bad.insert(format!("{from} -> {to} (cycle)"));
            }
        }
    }
    bad
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let edges = edges();
    let bad = violations(&edges);
    let known: BTreeSet<String> = KNOWN.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = bad.difference(&known).collect();
    let gone: Vec<_> = known.difference(&bad).collect();
    assert!(
        new.is_empty(),
        "imports that break the layering (ARCHITECTURE.md, Layers): {new:#?}"
    );
    assert!(
        gone.is_empty(),
        "edges listed in KNOWN no longer exist; remove them from the list: {gone:#?}"
    );
}

#[test]
fn the_check_sees_imports() {
    // The parser itself: plain paths, groups, and what it must ignore.
    let code = code_of(
        "use crate::hub::Hub;\nuse crate::{app::App, broker::{self, redis}};\n// crate::acme\n\
         fn f() { crate::metrics::x(); }\n#[cfg(test)]\nmod tests {\n    use crate::server;\n}\n",
    );
    assert_eq!(
        crate_paths(&code),
        ["hub::Hub", "app::App", "broker", "metrics::x"]
    );
    let edges: BTreeSet<(String, String)> = [("hub", "app"), ("app", "hub"), ("ws", "protocol")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bad = violations(&edges);
    assert!(bad.contains("hub -> app"), "{bad:?}");
    assert!(!bad.iter().any(|b| b.starts_with("ws")), "{bad:?}");
    let cyclic: BTreeSet<(String, String)> = [("ws", "protocol"), ("protocol", "ws")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(violations(&cyclic).len(), 2);
}
