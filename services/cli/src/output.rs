//! How answers are printed: aligned tables and key/value blocks for people, the API's own
//! JSON for scripts (`-o json`).

use serde_json::Value;
use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Tables and short summaries.
    #[default]
    Table,
    /// The API's JSON answer, unchanged (pretty-printed).
    Json,
}

pub fn print_json(value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    print_text(&format!("{text}\n"));
}

/// Writes to stdout; a closed pipe (`| head`) ends output quietly instead of panicking.
pub fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Columns padded to their widest cell; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                s.push_str(cell);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `key  value` lines, keys aligned; rows with an empty value are left out.
pub fn fields(rows: &[(&str, String)]) -> String {
    let shown: Vec<&(&str, String)> = rows.iter().filter(|(_, v)| !v.is_empty()).collect();
    let width = shown.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    shown
        .into_iter()
        .map(|(k, v)| {
            let mut lines = v.lines();
            let mut s = format!("{k:width$}  {}\n", lines.next().unwrap_or_default());
            for more in lines {
                s.push_str(&format!("{:width$}  {more}\n", ""));
            }
            s
        })
        .collect()
}

/// A JSON string or number as text; empty for null or missing.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 time as local time and how long ago: `2026-12-06 09:41:07 (3m ago)`.
pub fn time(v: &Value) -> String {
    let Some(t) = v
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return text(v);
    };
    let ago = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0) as f64;
    format!(
        "{} ({} ago)",
        t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
        crate::progress::duration(ago)
    )
}

/// How long ago, alone: `3m12s`.
pub fn age(v: &Value) -> String {
    v.as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            let s = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                .num_seconds()
                .max(0) as f64;
            crate::progress::duration(s)
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["ID", "STATUS", "ADAPTER"],
            &[
                vec!["1".into(), "succeeded".into(), "demo".into()],
                vec!["22".into(), "queued".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "ID  STATUS     ADAPTER\n1   succeeded  demo\n22  queued\n"
        );
    }

    #[test]
    fn fields_skip_empty_values_and_indent_continuations() {
        let f = fields(&[
            ("status", "failed".into()),
            ("error", "user_error: bad\nline two".into()),
            ("adapter", String::new()),
        ]);
        assert_eq!(
            f,
            "status  failed\nerror   user_error: bad\n        line two\n"
        );
    }
}
