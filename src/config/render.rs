//! The configuration as text: `outlived --check-config`, the commented default file that
//! packages ship, and the keys' documentation for `outlive.toml(5)`.

use super::*;

/// One key as the documentation shows it: the shipped file, `outlive.toml(5)`.
#[derive(Debug, Clone)]
pub struct KeyDoc {
    /// The TOML table ("" for top-level keys).
    pub section: &'static str,
    /// The key's name within its table.
    pub name: &'static str,
    /// The system agent's default, as TOML.
    pub default_toml: String,
    /// What it expects, in words ("an integer from 1 to 20").
    pub expects: String,
    /// Read only at start, not on reload.
    pub next_start: bool,
    pub doc: &'static str,
}

/// The paths of the system agent (root, installed), which the documentation shows.
pub fn system_paths() -> Paths {
    Paths {
        config_file: PathBuf::from("/etc/outlive/outlive.toml"),
        state_dir: PathBuf::from("/var/lib/outlive"),
        runtime_dir: PathBuf::from("/run/outlive"),
    }
}

/// Every key, documented, in table order.
pub fn documented_keys() -> Vec<KeyDoc> {
    let paths = system_paths();
    KEYS.iter()
        .map(|k| {
            let (section, name) = split_key(k.key);
            KeyDoc {
                section,
                name,
                default_toml: default_value(k, &paths).to_toml(),
                expects: expectation(k.kind),
                next_start: k.reload == Reload::NextStart,
                doc: k.doc,
            }
        })
        .collect()
}

/// The commented default file shipped as `/etc/outlive/outlive.toml`: every key, commented
/// out, with its meaning, default and range.
pub fn commented_default_file() -> String {
    let mut out = String::from(
        "# /etc/outlive/outlive.toml: configuration of outlived (see outlive.toml(5)).\n\
         # Every key is optional; the values shown are the defaults. Unknown keys and values out of\n\
         # range are errors: check with `outlived --check-config`, apply with\n\
         # `systemctl reload outlived`.\n",
    );
    let mut section = "";
    for k in documented_keys() {
        if k.section != section {
            out.push_str(&format!("\n[{}]\n", k.section));
            section = k.section;
        }
        out.push('\n');
        for line in wrap(k.doc, 94) {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!("# Expects {}.", k.expects));
        if k.next_start {
            out.push_str(" Takes effect at the next start, not on reload.");
        }
        out.push('\n');
        out.push_str(&format!("#{} = {}\n", k.name, k.default_toml));
    }
    out
}

/// Word-wrap text to `width` columns.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

impl Config {
    /// The effective configuration as TOML (`outlived --check-config`).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for k in KEYS {
            let (sec, name) = split_key(k.key);
            if sec != section {
                out.push_str(&format!("\n[{sec}]\n"));
                section = sec;
            }
            let v = &self.values[k.key];
            out.push_str(&format!("{name} = {}\n", v.to_toml()));
        }
        out.trim_start().to_string()
    }
}
