//! Parsing of the Cilium service annotations (DESIGN.md section 1).
//!
//! Users write the annotations they know from Cilium, current or legacy spelling. The rules:
//!
//! - `true`/`false` and `local`/`remote`/`none` are matched case-insensitively, as Cilium does
//!   (`strings.ToLower`); nothing else is trimmed or guessed.
//! - An invalid value (including an empty or whitespace-only one) is reported and treated as
//!   the default of that annotation, never as some other behaviour: global `false`, shared
//!   `true`, affinity `none`.
//! - When the current and the legacy key are both set, the current key wins; if their values
//!   disagree, the disagreement is reported.
//!
//! The caller decides how to report a problem (log line, Kubernetes Event, metric); every
//! [`AnnotationProblem`] names the key and value.

use std::fmt;

use crate::Affinity;

pub const GLOBAL: &str = "service.cilium.io/global";
pub const SHARED: &str = "service.cilium.io/shared";
pub const AFFINITY: &str = "service.cilium.io/affinity";
pub const LEGACY_GLOBAL: &str = "io.cilium/global-service";
pub const LEGACY_SHARED: &str = "io.cilium/shared-service";
pub const LEGACY_AFFINITY: &str = "io.cilium/service-affinity";

/// What the annotations of a Service ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAnnotations {
    /// The Service is global: the same namespace/name in every cluster form one service.
    pub global: bool,
    /// This cluster exports its backends to the other clusters.
    pub shared: bool,
    pub affinity: Affinity,
}

impl Default for ServiceAnnotations {
    fn default() -> Self {
        Self {
            global: false,
            shared: true,
            affinity: Affinity::None,
        }
    }
}

/// An annotation value that was ignored, with why and what was used instead.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnnotationProblem {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for AnnotationProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}={:?}: {}",
            self.key, self.value, self.reason
        )
    }
}

impl std::error::Error for AnnotationProblem {}

/// Parses the Cilium service annotations out of a Service's annotations. Annotations that
/// are not Cilium service annotations are ignored. Returns what the valid annotations ask
/// for and every problem found; a problem never turns into a behaviour other than the
/// default of its annotation.
pub fn parse_service_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (ServiceAnnotations, Vec<AnnotationProblem>) {
    let mut raw = Raw::default();
    for (key, value) in annotations {
        let slot = match key {
            GLOBAL => &mut raw.global,
            LEGACY_GLOBAL => &mut raw.legacy_global,
            SHARED => &mut raw.shared,
            LEGACY_SHARED => &mut raw.legacy_shared,
            AFFINITY => &mut raw.affinity,
            LEGACY_AFFINITY => &mut raw.legacy_affinity,
            _ => continue,
        };
        *slot = Some(value);
    }

    let mut problems = Vec::new();
    let defaults = ServiceAnnotations::default();
    let global = resolve(
        Key::bool(GLOBAL, LEGACY_GLOBAL, defaults.global),
        raw.global,
        raw.legacy_global,
        parse_bool,
        &mut problems,
    );
    let shared = resolve(
        Key::bool(SHARED, LEGACY_SHARED, defaults.shared),
        raw.shared,
        raw.legacy_shared,
        parse_bool,
        &mut problems,
    );
    let affinity = resolve(
        Key {
            current: AFFINITY,
            legacy: LEGACY_AFFINITY,
            default: defaults.affinity,
            expected: "expected one of local, remote, none",
        },
        raw.affinity,
        raw.legacy_affinity,
        parse_affinity,
        &mut problems,
    );
    (
        ServiceAnnotations {
            global,
            shared,
            affinity,
        },
        problems,
    )
}

#[derive(Default)]
struct Raw<'a> {
    global: Option<&'a str>,
    legacy_global: Option<&'a str>,
    shared: Option<&'a str>,
    legacy_shared: Option<&'a str>,
    affinity: Option<&'a str>,
    legacy_affinity: Option<&'a str>,
}

struct Key<T> {
    current: &'static str,
    legacy: &'static str,
    default: T,
    expected: &'static str,
}

impl Key<bool> {
    fn bool(current: &'static str, legacy: &'static str, default: bool) -> Self {
        Self {
            current,
            legacy,
            default,
            expected: "expected true or false",
        }
    }
}

/// Resolves one annotation from its current and legacy spellings.
fn resolve<T: Copy + PartialEq + fmt::Display>(
    key: Key<T>,
    current: Option<&str>,
    legacy: Option<&str>,
    parse: fn(&str) -> Option<T>,
    problems: &mut Vec<AnnotationProblem>,
) -> T {
    let mut check = |k: &str, v: &str| {
        let parsed = parse(v);
        if parsed.is_none() {
            problems.push(AnnotationProblem {
                key: k.into(),
                value: v.into(),
                reason: format!("{}; treated as {}", key.expected, key.default),
            });
        }
        parsed
    };
    let cur = current.map(|v| (v, check(key.current, v)));
    let leg = legacy.map(|v| (v, check(key.legacy, v)));
    match (cur, leg) {
        (None, None) => key.default,
        (None, Some((_, l))) => l.unwrap_or(key.default),
        (Some((_, c)), None) => c.unwrap_or(key.default),
        (Some((cv, c)), Some((lv, l))) => {
            // The current key wins, even when its value is invalid: an invalid value means
            // the default, whatever the legacy key says.
            let effective = c.unwrap_or(key.default);
            if matches!((c, l), (Some(c), Some(l)) if c != l) {
                problems.push(AnnotationProblem {
                    key: key.legacy.into(),
                    value: lv.into(),
                    reason: format!(
                        "disagrees with {}={cv:?}, which takes precedence; ignored",
                        key.current
                    ),
                });
            } else if c.is_none() && l.is_some() {
                problems.push(AnnotationProblem {
                    key: key.legacy.into(),
                    value: lv.into(),
                    reason: format!(
                        "ignored because {} is also set (to an invalid value); treated as {effective}",
                        key.current
                    ),
                });
            }
            effective
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn parse_affinity(v: &str) -> Option<Affinity> {
    [Affinity::Local, Affinity::Remote, Affinity::None]
        .into_iter()
        .find(|a| v.eq_ignore_ascii_case(a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (ServiceAnnotations, Vec<String>) {
        let (a, p) = parse_service_annotations(pairs.iter().copied());
        (a, p.iter().map(ToString::to_string).collect())
    }

    fn with(global: bool, shared: bool, affinity: Affinity) -> ServiceAnnotations {
        ServiceAnnotations {
            global,
            shared,
            affinity,
        }
    }

    #[test]
    fn defaults() {
        let (a, p) = parse(&[]);
        assert_eq!(a, with(false, true, Affinity::None));
        assert!(p.is_empty());
        let (a, p) = parse(&[("app", "x"), ("service.cilium.io/other", "true")]);
        assert_eq!(a, ServiceAnnotations::default());
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn valid_values_of_every_key() {
        use Affinity::*;
        let d = ServiceAnnotations::default();
        let cases: &[(&str, &str, ServiceAnnotations)] = &[
            (GLOBAL, "true", with(true, true, None)),
            (GLOBAL, "TRUE", with(true, true, None)),
            (GLOBAL, "True", with(true, true, None)),
            (GLOBAL, "false", d),
            (GLOBAL, "False", d),
            (LEGACY_GLOBAL, "true", with(true, true, None)),
            (LEGACY_GLOBAL, "tRuE", with(true, true, None)),
            (LEGACY_GLOBAL, "false", d),
            (SHARED, "false", with(false, false, None)),
            (SHARED, "FALSE", with(false, false, None)),
            (SHARED, "true", d),
            (LEGACY_SHARED, "false", with(false, false, None)),
            (LEGACY_SHARED, "True", d),
            (AFFINITY, "local", with(false, true, Local)),
            (AFFINITY, "Local", with(false, true, Local)),
            (AFFINITY, "remote", with(false, true, Remote)),
            (AFFINITY, "REMOTE", with(false, true, Remote)),
            (AFFINITY, "none", d),
            (AFFINITY, "None", d),
            (LEGACY_AFFINITY, "local", with(false, true, Local)),
            (LEGACY_AFFINITY, "remote", with(false, true, Remote)),
            (LEGACY_AFFINITY, "NONE", d),
        ];
        for (key, value, want) in cases {
            let (got, p) = parse(&[(key, value)]);
            assert_eq!(got, *want, "{key}={value:?}");
            assert!(p.is_empty(), "{key}={value:?}: unexpected problems {p:?}");
        }
    }

    #[test]
    fn invalid_values_of_every_key_are_reported_and_default() {
        let bools = [
            "", " ", "\t", "yes", "1", "0", "no", " true", "true ", "truee", "on",
        ];
        let affinities = [
            "",
            "  ",
            "loca",
            "locale",
            "preferred",
            "true",
            " local",
            "remote\n",
        ];
        let mut cases: Vec<(&str, &str, &str)> = Vec::new();
        for key in [GLOBAL, LEGACY_GLOBAL] {
            cases.extend(
                bools
                    .iter()
                    .map(|v| (key, *v, "expected true or false; treated as false")),
            );
        }
        for key in [SHARED, LEGACY_SHARED] {
            cases.extend(
                bools
                    .iter()
                    .map(|v| (key, *v, "expected true or false; treated as true")),
            );
        }
        for key in [AFFINITY, LEGACY_AFFINITY] {
            cases.extend(affinities.iter().map(|v| {
                (
                    key,
                    *v,
                    "expected one of local, remote, none; treated as none",
                )
            }));
        }
        for (key, value, reason) in cases {
            let (got, p) = parse(&[(key, value)]);
            assert_eq!(got, ServiceAnnotations::default(), "{key}={value:?}");
            assert_eq!(
                p,
                vec![format!("annotation {key}={value:?}: {reason}")],
                "{key}={value:?}"
            );
        }
    }

    #[test]
    fn display_names_key_and_value() {
        let (_, p) = parse(&[(AFFINITY, "loca")]);
        assert_eq!(
            p,
            [
                r#"annotation service.cilium.io/affinity="loca": expected one of local, remote, none; treated as none"#
            ]
        );
    }

    #[test]
    fn current_and_legacy_agreeing() {
        let (a, p) = parse(&[
            (GLOBAL, "true"),
            (LEGACY_GLOBAL, "TRUE"),
            (SHARED, "false"),
            (LEGACY_SHARED, "False"),
            (AFFINITY, "remote"),
            (LEGACY_AFFINITY, "Remote"),
        ]);
        assert_eq!(a, with(true, false, Affinity::Remote));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn current_wins_over_disagreeing_legacy() {
        let cases: &[(&str, &str, &str, &str, ServiceAnnotations)] = &[
            (
                GLOBAL,
                "true",
                LEGACY_GLOBAL,
                "false",
                with(true, true, Affinity::None),
            ),
            (
                GLOBAL,
                "false",
                LEGACY_GLOBAL,
                "true",
                ServiceAnnotations::default(),
            ),
            (
                SHARED,
                "false",
                LEGACY_SHARED,
                "true",
                with(false, false, Affinity::None),
            ),
            (
                SHARED,
                "true",
                LEGACY_SHARED,
                "false",
                ServiceAnnotations::default(),
            ),
            (
                AFFINITY,
                "local",
                LEGACY_AFFINITY,
                "remote",
                with(false, true, Affinity::Local),
            ),
            (
                AFFINITY,
                "none",
                LEGACY_AFFINITY,
                "local",
                ServiceAnnotations::default(),
            ),
        ];
        for (cur, cv, leg, lv, want) in cases {
            // Order of the input must not matter.
            for pairs in [[(*cur, *cv), (*leg, *lv)], [(*leg, *lv), (*cur, *cv)]] {
                let (got, p) = parse(&pairs);
                assert_eq!(got, *want, "{pairs:?}");
                assert_eq!(
                    p,
                    [format!(
                        "annotation {leg}={lv:?}: disagrees with {cur}={cv:?}, which takes precedence; ignored"
                    )],
                    "{pairs:?}"
                );
            }
        }
    }

    #[test]
    fn invalid_current_with_valid_legacy_means_default() {
        let (a, p) = parse(&[(AFFINITY, "loca"), (LEGACY_AFFINITY, "local")]);
        assert_eq!(a.affinity, Affinity::None);
        assert_eq!(
            p,
            [
                r#"annotation service.cilium.io/affinity="loca": expected one of local, remote, none; treated as none"#,
                r#"annotation io.cilium/service-affinity="local": ignored because service.cilium.io/affinity is also set (to an invalid value); treated as none"#,
            ]
        );
        let (a, p) = parse(&[(SHARED, ""), (LEGACY_SHARED, "false")]);
        assert!(a.shared);
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn valid_current_with_invalid_legacy() {
        let (a, p) = parse(&[(GLOBAL, "true"), (LEGACY_GLOBAL, "yes")]);
        assert!(a.global);
        assert_eq!(
            p,
            [
                r#"annotation io.cilium/global-service="yes": expected true or false; treated as false"#
            ]
        );
    }

    #[test]
    fn problems_of_several_keys() {
        let (a, p) = parse(&[
            (GLOBAL, "true"),
            (SHARED, "nope"),
            (LEGACY_AFFINITY, "near"),
        ]);
        assert_eq!(a, with(true, true, Affinity::None));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains(SHARED) && p[1].contains(LEGACY_AFFINITY),
            "{p:?}"
        );
    }
}
