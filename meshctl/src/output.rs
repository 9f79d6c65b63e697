//! Output in the conventions of kubectl and cilium-cli: a table by default, `-o json|yaml`.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Left-aligned columns separated by three spaces, like `kubectl get`.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                let pad = widths[i] + 3 - c.chars().count();
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_columns() {
        let t = table(
            &["NAME", "ID"],
            &[
                vec!["east".into(), "1".into()],
                vec!["a".into(), "200".into()],
            ],
        );
        assert_eq!(t, "NAME   ID\neast   1\na      200\n");
    }
}
