//! The string form of a label selector (`app=x,tier in (a,b),!legacy`), as kubectl's
//! `-l` and Hubble's `--from-label` take it. Keys may carry a label source prefix
//! (`k8s:app`, `any:app`), which is dropped: every identity label is a `k8s:` label.

use super::{Requirement, Selector, SelectorOp};

/// Why a selector string was refused: the whole string and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorParseError {
    pub selector: String,
    pub reason: String,
}

/// Parses a selector string; the empty string is the empty selector (matches everything).
pub fn parse_selector(s: &str) -> Result<Selector, SelectorParseError> {
    let err = |reason: String| SelectorParseError {
        selector: s.to_owned(),
        reason,
    };
    let mut requirements = Vec::new();
    for term in split_terms(s).map_err(err)? {
        requirements.push(parse_term(term).map_err(err)?);
    }
    Ok(Selector { requirements })
}

/// Splits on commas outside parentheses; refuses unbalanced parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    out.push(&s[start..]);
    let terms: Vec<&str> = out.into_iter().map(str::trim).collect();
    if terms.len() > 1 && terms.iter().any(|t| t.is_empty()) {
        return Err("empty requirement between commas".into());
    }
    Ok(terms.into_iter().filter(|t| !t.is_empty()).collect())
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let k = k
        .strip_prefix("k8s:")
        .or_else(|| k.strip_prefix("any:"))
        .unwrap_or(k);
    let ok = !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(k.to_owned())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!("invalid label value {v:?}"))
    }
}

fn set(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set of values in {term:?}"))?;
    let values = inner.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
    if values.iter().any(String::is_empty) {
        return Err(format!("empty value in the set of {term:?}"));
    }
    Ok(values)
}

fn parse_term(t: &str) -> Result<Requirement, String> {
    if let Some(k) = t.strip_prefix('!') {
        return Ok(Requirement {
            key: key(k)?,
            op: SelectorOp::DoesNotExist,
        });
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(Requirement {
            key: key(k)?,
            op: SelectorOp::NotIn(vec![value(v)?]),
        });
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(Requirement::equals(key(k)?, value(v)?));
    }
    let words: Vec<&str> = t.splitn(3, char::is_whitespace).collect();
    match words.as_slice() {
        [k] => Ok(Requirement {
            key: key(k)?,
            op: SelectorOp::Exists,
        }),
        [k, op, rest] if *op == "in" => Ok(Requirement {
            key: key(k)?,
            op: SelectorOp::In(set(rest, t)?),
        }),
        [k, op, rest] if *op == "notin" => Ok(Requirement {
            key: key(k)?,
            op: SelectorOp::NotIn(set(rest, t)?),
        }),
        _ => Err(format!("cannot parse requirement {t:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        parse_selector(s).unwrap()
    }

    #[test]
    fn forms_parse_and_print_back() {
        for (input, shown) in [
            ("app=x", "app=x"),
            ("k8s:app==x", "app=x"),
            ("app!=x", "app notin (x)"),
            ("tier in (a, b)", "tier in (a,b)"),
            ("tier notin (a)", "tier notin (a)"),
            ("app", "app"),
            ("!legacy", "!legacy"),
            (
                "app=x, io.cilium.k8s.policy.cluster=east",
                "app=x,io.cilium.k8s.policy.cluster=east",
            ),
            ("", "{}"),
        ] {
            assert_eq!(sel(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn selectors_match_labels() {
        let labels = [("app", "x"), ("tier", "b")];
        let get = |k: &str| labels.iter().find(|(lk, _)| *lk == k).map(|(_, v)| *v);
        assert!(sel("app=x,tier in (a,b)").matches_with(get));
        assert!(!sel("app=x,tier notin (a,b)").matches_with(get));
        assert!(sel("!legacy").matches_with(get));
        assert!(!sel("legacy").matches_with(get));
    }

    #[test]
    fn bad_strings_name_the_selector_and_problem() {
        for (input, why) in [
            ("app=x,,tier=a", "empty requirement"),
            ("tier in (a", "unbalanced"),
            ("tier in a", "parenthesised"),
            ("app=x y", "invalid label value"),
            ("a b c", "cannot parse"),
            ("=x", "invalid label key"),
        ] {
            let e = parse_selector(input).unwrap_err();
            assert_eq!(e.selector, input);
            assert!(e.to_string().contains(why), "{input}: {e}");
        }
    }
}
