//! The rule index (`docs/behaviour.md`) resolves every rule tag in the code: each tag in `src/`
//! (`\b[HLQDPGXC]-[0-9]{1,2}\b`) has a row there, and each row names at least one source file,
//! every one of which exists. A tag added to the code without its rule, or a file moved without
//! its row, fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LETTERS: &[u8] = b"HLQDPGXC";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `X-n` tag in `text`, with `\b` on both sides and one or two digits.
fn tags(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    for i in 0..b.len() {
        if !LETTERS.contains(&b[i]) || i + 2 >= b.len() || b[i + 1] != b'-' {
            continue;
        }
        if i > 0 && word(b[i - 1]) {
            continue;
        }
        let digits = b[i + 2..].iter().take_while(|c| c.is_ascii_digit()).count();
        let end = i + 2 + digits;
        if !(1..=2).contains(&digits) || (end < b.len() && word(b[end])) {
            continue;
        }
        out.push(text[i..end].to_string());
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The index's rows: rule id ⇒ the `src/…` paths its last column names.
fn index() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo().join("docs/behaviour.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("| ") else {
            continue;
        };
        let id = rest.split(' ').next().unwrap_or("");
        if tags(id).first().map(String::as_str) != Some(id) {
            continue;
        }
        let last = line.trim_end_matches('|').rsplit('|').next().unwrap_or("");
        let paths: Vec<String> = last
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(
            rows.insert(id.to_string(), paths).is_none(),
            "{id} has two rows"
        );
    }
    rows
}

#[test]
fn tag_scanner_matches_the_pattern() {
    assert_eq!(
        tags("L-4 row 10, (Q-14) D-6: X-12 H-123 aL-2 L-2x G-10."),
        ["L-4", "Q-14", "D-6", "X-12", "G-10"]
    );
}

#[test]
fn every_rule_tag_in_src_has_a_row_in_docs_behaviour() {
    let rows = index();
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut seen = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for t in tags(&text) {
            seen += 1;
            if !rows.contains_key(&t) {
                let rel = f.strip_prefix(repo()).unwrap().display().to_string();
                missing.entry(t).or_default().insert(rel);
            }
        }
    }
    assert!(seen > 300, "the scan found only {seen} tags in src/");
    assert!(
        missing.is_empty(),
        "rule tags in src/ without a row in docs/behaviour.md (add the rule, with where it \
         lives): {missing:?}"
    );
}

#[test]
fn every_row_of_docs_behaviour_names_source_files_that_exist() {
    let rows = index();
    assert!(rows.len() >= 59, "only {} rows parsed", rows.len());
    for (id, paths) in &rows {
        assert!(!paths.is_empty(), "{id} names no source file");
        for p in paths {
            assert!(p.starts_with("src/"), "{id} names {p}, not a source file");
            assert!(
                repo().join(p).is_file(),
                "{id} names {p}, which does not exist (moved? update docs/behaviour.md)"
            );
        }
    }
}
