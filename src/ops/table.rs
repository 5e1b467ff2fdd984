//! Aligned text tables for the operator commands.

/// Render `rows` under `headers` as left-aligned columns separated by two spaces, with no
/// trailing blanks. Widths count characters, so labels with accents still line up.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(widths.len()) {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Render key/value pairs as two aligned columns (for one object).
pub fn render_pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let pad = width - k.chars().count();
        let line = format!("{k}:{}  {v}", " ".repeat(pad));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A cell for an empty value.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_blanks() {
        let t = render(
            &["ID", "NAME", "SIZE"],
            &[
                vec!["7".into(), "pvc-a".into(), "10".into()],
                vec!["1234".into(), "é".into(), "".into()],
            ],
        );
        assert_eq!(t, "ID    NAME   SIZE\n7     pvc-a  10\n1234  é\n");
    }

    #[test]
    fn header_only_when_empty() {
        assert_eq!(render(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn pairs_align() {
        let t = render_pairs(&[("id", "3".into()), ("status", "".into())]);
        assert_eq!(t, "id:      3\nstatus:\n");
        assert_eq!(or_dash(""), "-");
    }
}
