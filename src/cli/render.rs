//! Rendering helpers for `outlivectl`: aligned key/value blocks and tables for people, and the
//! one way text reaches a person's terminal.
//!
//! Strings in the output come from callers (a run's session, reason, working directory, a
//! pause reason) and from files (drop-in descriptions, lock records, the audit log). A terminal
//! acts on control characters (`ESC ] 0 ;` retitles it, `ESC [ 2 J` clears it, a bare `\r`
//! overwrites a line), so every control character (C0, DEL, C1) in human output is shown as
//! `\xNN` instead (§12, human output): [`clean`] for one field (a line break too), [`say`] and
//! [`emit`] for whole blocks (line breaks kept). `--json` output is JSON, which escapes them.

/// One field for a person: every control character, line breaks included, as `\xNN`.
pub(crate) fn clean(s: &str) -> String {
    crate::audit::escape_controls(s, false)
}

/// A block for a person: control characters as `\xNN`, line breaks and tabs kept.
pub(crate) fn clean_lines(s: &str) -> String {
    crate::audit::escape_controls(s, true)
}

/// A timestamp (wall ms) for a table: `2026-11-30 09:02:19`, `-` for none.
pub(crate) fn ts(v: &serde_json::Value) -> String {
    v.as_u64()
        .filter(|&t| t > 0)
        .map(|t| crate::clock::rfc3339_ms(t)[..19].replace('T', " "))
        .unwrap_or_else(|| "-".into())
}

/// Print JSON for scripts (`--json`).
pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Print a line for a person ([`clean_lines`]).
pub(crate) fn say(text: &str) {
    println!("{}", clean_lines(text));
}

/// Print a block for a person ([`clean_lines`]), without adding a line break.
pub(crate) fn emit(text: &str) {
    print!("{}", clean_lines(text));
}

/// Key/value lines with the values aligned.
pub(crate) fn pairs(rows: &[(String, String)], indent: usize) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&" ".repeat(indent));
        out.push_str(k);
        out.push_str(&" ".repeat(width - k.chars().count() + 2));
        out.push_str(&clean(v));
        out.push('\n');
    }
    out
}

/// A table with a header row; columns padded to their widest cell.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(n) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned() {
        let p = pairs(
            &[("a".into(), "1".into()), ("long key".into(), "2".into())],
            2,
        );
        assert_eq!(p, "  a         1\n  long key  2\n");
        let t = table(&["ID", "STATUS"], &[vec!["rq-1".into(), "queued".into()]]);
        assert_eq!(t, "ID    STATUS\nrq-1  queued\n");
    }

    /// §12 human output (security review finding 8): the reviewer's sequence retitled the
    /// terminal, cleared it and painted a fake status line. Every control character is shown
    /// as `\xNN`; a field cannot break its line either.
    #[test]
    fn control_characters_are_shown_not_sent() {
        let evil = "ok\x1b]0;pwned-title\x07\x1b[2J\x1b[31mFAKE: all runs revived\x1b[0m";
        assert_eq!(
            clean(evil),
            "ok\\x1b]0;pwned-title\\x07\\x1b[2J\\x1b[31mFAKE: all runs revived\\x1b[0m"
        );
        assert_eq!(
            clean("a\nb\rc\td\u{7f}e\u{9b}f"),
            "a\\x0ab\\x0dc\\x09d\\x7fe\\x9bf"
        );
        assert_eq!(clean_lines("a\nb\u{1b}c"), "a\nb\\x1bc");
        assert_eq!(clean("héllo ✓"), "héllo ✓", "printable text is untouched");
        let t = table(&["ID", "SESSION"], &[vec!["rq-1".into(), evil.into()]]);
        assert!(!t.contains('\x1b') && !t.contains('\x07'), "{t:?}");
        assert_eq!(t.lines().count(), 2);
        let p = pairs(&[("reason".into(), "a\nFAKE".into())], 0);
        assert_eq!(p.lines().count(), 1, "{p:?}");
    }
}
