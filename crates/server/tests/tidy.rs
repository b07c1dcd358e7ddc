//! Tidy checks over the whole workspace, run as an ordinary test: every Rust source file
//! starts with a `//!` module doc saying what it owns, and module docs do not go stale in the
//! ways a program can see — a file they name in backticks exists, and a protocol they say the
//! module serves is mentioned by the module or by a module that uses it.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

fn workspace() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

/// A Rust source file: its path, its crate directory, its `//!` doc and the rest (code and
/// ordinary comments), both lowercased.
struct Source {
    path: PathBuf,
    krate: PathBuf,
    doc: String,
    code: String,
}

fn sources() -> Vec<Source> {
    let crates = workspace().join("crates");
    let mut all = Vec::new();
    files(&crates, &mut all);
    all.into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let (mut doc, mut code) = (String::new(), String::new());
            let mut in_doc = true;
            for line in text.lines() {
                in_doc &= line.starts_with("//!");
                let to = if in_doc { &mut doc } else { &mut code };
                to.push_str(&line.to_lowercase());
                to.push('\n');
            }
            let krate = path
                .strip_prefix(&crates)
                .ok()
                .and_then(|rel| rel.components().next())
                .map(|c| crates.join(c))
                .unwrap_or_default();
            Source {
                path,
                krate,
                doc,
                code,
            }
        })
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `word` occurs in `text` with no identifier character on either side.
fn has_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// The module a file defines, if it is a module of its crate rather than a root (`lib.rs`,
/// `main.rs`, `build.rs`, an integration test, an example or a bench, which describe a whole
/// crate and whose users the check cannot see).
fn module_name(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let parent = path.parent()?;
    let parent_name = parent.file_name()?.to_str()?;
    if matches!(stem, "lib" | "main" | "build")
        || matches!(parent_name, "tests" | "examples" | "benches" | "bin")
    {
        return None;
    }
    if stem == "mod" {
        return Some(parent_name.to_owned());
    }
    Some(stem.to_owned())
}

/// `code` refers to module `m` by a path: `m::`, `crate::m::`, `super::m::` or `self::m::`
/// (not `other::m::`, which is someone else's module of the same name).
fn uses_module(code: &str, m: &str) -> bool {
    let pat = format!("{m}::");
    code.match_indices(&pat).any(|(i, _)| {
        let before = &code[..i];
        if before.chars().next_back().is_some_and(is_ident) {
            return false;
        }
        match before.strip_suffix("::") {
            None => true,
            Some(rest) => ["crate", "super", "self"]
                .iter()
                .any(|k| rest.ends_with(k) && !rest[..rest.len() - k.len()].ends_with(is_ident)),
        }
    })
}

#[test]
fn every_source_file_has_a_module_doc() {
    let all = sources();
    assert!(all.len() > 10, "found only {} files", all.len());
    let missing: Vec<_> = all
        .iter()
        .filter(|s| s.doc.is_empty())
        .map(|s| &s.path)
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! module doc: {missing:#?}"
    );
}

/// A file named in backticks in a module doc (`something.rs`, `.proto`, `.toml`, `.md`, `.py`,
/// `.sh`) exists somewhere in the workspace: a rename or a split leaves no dangling name.
#[test]
fn files_named_in_module_docs_exist() {
    let root = workspace();
    let mut all = Vec::new();
    files(&root, &mut all);
    let all: Vec<String> = all
        .iter()
        .filter_map(|p| p.strip_prefix(&root).ok())
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .collect();
    let exts = [".rs", ".proto", ".toml", ".md", ".py", ".sh"];
    let mut dangling = Vec::new();
    for s in sources() {
        for (i, quoted) in s.doc.split('`').enumerate() {
            // Odd pieces are inside backticks.
            let named = i % 2 == 1
                && !quoted.contains(char::is_whitespace)
                && exts.iter().any(|e| quoted.ends_with(e));
            if !named {
                continue;
            }
            let exists = all.iter().any(|a| {
                a.to_lowercase() == quoted || a.to_lowercase().ends_with(&format!("/{quoted}"))
            });
            if !exists {
                dangling.push(format!("{}: `{quoted}`", s.path.display()));
            }
        }
    }
    assert!(
        dangling.is_empty(),
        "module docs name files that do not exist: {dangling:#?}"
    );
}

/// A module doc that says the module serves a protocol (gRPC, SSE, Nacos) is stale when
/// neither the module nor any module of its crate that uses it mentions that protocol: e.g. a
/// helper whose doc says "for SSE and gRPC" while only the SSE code calls it.
#[test]
fn protocols_in_module_docs_are_real() {
    let protocols: [(&str, &[&str]); 3] = [
        ("gRPC", &["grpc"]),
        ("SSE", &["sse", "server-sent", "event-stream"]),
        ("Nacos", &["nacos"]),
    ];
    let all = sources();
    let mut stale = Vec::new();
    for s in &all {
        let Some(m) = module_name(&s.path) else {
            continue;
        };
        for (name, words) in protocols {
            let mentions = |text: &str| words.iter().any(|w| has_word(text, w));
            if !mentions(&s.doc) || mentions(&s.code) {
                continue;
            }
            let used_there = all.iter().any(|u| {
                u.path != s.path
                    && u.krate == s.krate
                    && uses_module(&u.code, &m)
                    && mentions(&u.code)
            });
            if !used_there {
                stale.push(format!(
                    "{}: its doc names {name}, but neither it nor a module using `{m}` does",
                    s.path.display()
                ));
            }
        }
    }
    assert!(stale.is_empty(), "stale module docs: {stale:#?}");
}
