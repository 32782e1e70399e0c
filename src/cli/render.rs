//! Rendering helpers for `outlivectl`: aligned key/value blocks and tables for people.

/// Key/value lines with the values aligned.
pub fn pairs(rows: &[(String, String)], indent: usize) -> String {
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
        out.push_str(v);
        out.push('\n');
    }
    out
}

/// A table with a header row; columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
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
    for r in rows {
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
}
