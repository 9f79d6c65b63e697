//! What a benchmark prints: distributions (count, p50/p90/p99/max) and single figures, each
//! beside its DESIGN.md section 12 target, as a table (default) or JSON (`-o json`).
//!
//! A target is information, never an assertion: `met` says whether this run reached it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Output format (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One benchmark's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub benchmark: String,
    pub machine: Machine,
    /// How the figures were measured (clock, polling, resolution).
    pub method: String,
    /// Sizes and options of this run.
    pub params: BTreeMap<String, serde_json::Value>,
    pub distributions: Vec<Distribution>,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
    /// Where the time of a distribution's samples goes, one distribution per hop (samples
    /// missing the hop counted in `timeouts`). Empty for most benchmarks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<Distribution>,
    /// One row per sample (e.g. each sample's hops, in ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleTable>,
}

/// A table of per-sample values, printed as it is.
#[derive(Debug, Clone, Serialize)]
pub struct SampleTable {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    /// `release` or `debug` (of the benchmark binary and the components it runs).
    pub build: &'static str,
    pub kernel: String,
    /// How the apiserver and agent ran: the real binaries or this binary re-executed.
    pub components: String,
}

impl Machine {
    pub fn detect(components: String) -> Self {
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            components,
        }
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub name: String,
    /// Samples that completed (timeouts are counted apart).
    pub count: usize,
    pub timeouts: usize,
    pub min_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// e.g. `p50 <= 20 ms, p99 <= 50 ms`.
    pub target: Option<String>,
    pub met: Option<bool>,
}

/// Targets of a distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyTarget {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Distribution {
    pub fn new(
        name: &str,
        samples: &[Duration],
        timeouts: usize,
        target: Option<LatencyTarget>,
    ) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let mean = if ms.is_empty() {
            0.0
        } else {
            ms.iter().sum::<f64>() / ms.len() as f64
        };
        let p50 = percentile(&ms, 50.0);
        let p99 = percentile(&ms, 99.0);
        let (target_text, met) = match target {
            None => (None, None),
            Some(t) => {
                let mut parts = Vec::new();
                let mut met = timeouts == 0 && !ms.is_empty();
                if let Some(v) = t.p50_ms {
                    parts.push(format!("p50 <= {v} ms"));
                    met &= p50 <= v;
                }
                if let Some(v) = t.p99_ms {
                    parts.push(format!("p99 <= {v} ms"));
                    met &= p99 <= v;
                }
                (Some(parts.join(", ")), Some(met))
            }
        };
        Distribution {
            name: name.to_owned(),
            count: ms.len(),
            timeouts,
            min_ms: ms.first().copied().unwrap_or(0.0),
            p50_ms: p50,
            p90_ms: percentile(&ms, 90.0),
            p99_ms: p99,
            max_ms: ms.last().copied().unwrap_or(0.0),
            mean_ms: mean,
            target: target_text,
            met,
        }
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A single figure (a count, a rate, a duration, a size).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub target: Option<String>,
    pub met: Option<bool>,
}

/// How a figure compares to its target.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Figure {
    pub fn new(name: &str, value: f64, unit: &str) -> Self {
        Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            target: None,
            met: None,
        }
    }

    pub fn with_target(mut self, target: Target) -> Self {
        let (text, met) = match target {
            Target::AtMost(t) => (format!("<= {} {}", fmt_num(t), self.unit), self.value <= t),
            Target::AtLeast(t) => (format!(">= {} {}", fmt_num(t), self.unit), self.value >= t),
        };
        self.target = Some(text);
        self.met = Some(met);
        self
    }

    /// [`Figure::with_target`] when `applies` (e.g. a target stated for the default size).
    pub fn with_target_if(self, applies: bool, target: Target) -> Self {
        if applies {
            self.with_target(target)
        } else {
            self
        }
    }

    /// A target stated in words (e.g. "lower than direct etcd"), with whether it was met.
    pub fn with_target_text(mut self, text: &str, met: bool) -> Self {
        self.target = Some(text.to_owned());
        self.met = Some(met);
        self
    }
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// A distribution's name, counts and percentiles as table cells (latencies and hops).
fn distribution_cells(d: &Distribution) -> Vec<String> {
    vec![
        d.name.clone(),
        d.count.to_string(),
        d.timeouts.to_string(),
        format!("{:.2}", d.p50_ms),
        format!("{:.2}", d.p90_ms),
        format!("{:.2}", d.p99_ms),
        format!("{:.2}", d.max_ms),
    ]
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "",
    }
}

/// Renders rows as an aligned table (kubectl style: upper-case headers, two spaces).
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

impl Report {
    pub fn new(benchmark: &str, machine: Machine, method: &str) -> Self {
        Report {
            benchmark: benchmark.to_owned(),
            machine,
            method: method.to_owned(),
            params: BTreeMap::new(),
            distributions: Vec::new(),
            figures: Vec::new(),
            notes: Vec::new(),
            hops: Vec::new(),
            samples: None,
        }
    }

    pub fn param(&mut self, name: &str, value: impl Serialize) {
        self.params.insert(
            name.to_owned(),
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
        );
    }

    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "== {} ({} cores, {} build, kernel {}, components: {})",
            self.benchmark, m.cores, m.build, m.kernel, m.components
        );
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
            .collect();
        if !params.is_empty() {
            let _ = writeln!(out, "params: {}", params.join(" "));
        }
        let _ = writeln!(out, "method: {}", self.method);
        if !self.distributions.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .distributions
                .iter()
                .map(|d| {
                    let mut row = distribution_cells(d);
                    row.push(d.target.clone().unwrap_or_default());
                    row.push(met_text(d.met).to_owned());
                    row
                })
                .collect();
            out.push_str(&table(
                &[
                    "LATENCY", "SAMPLES", "TIMEOUTS", "P50(ms)", "P90(ms)", "P99(ms)", "MAX(ms)",
                    "TARGET", "MET",
                ],
                &rows,
            ));
        }
        if let Some(t) = &self.samples {
            out.push('\n');
            let headers: Vec<&str> = t.columns.iter().map(String::as_str).collect();
            out.push_str(&table(&headers, &t.rows));
        }
        if !self.hops.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self.hops.iter().map(distribution_cells).collect();
            out.push_str(&table(
                &[
                    "HOP", "SAMPLES", "MISSING", "P50(ms)", "P90(ms)", "P99(ms)", "MAX(ms)",
                ],
                &rows,
            ));
        }
        if !self.figures.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .figures
                .iter()
                .map(|f| {
                    vec![
                        f.name.clone(),
                        fmt_num(f.value),
                        f.unit.clone(),
                        f.target.clone().unwrap_or_default(),
                        met_text(f.met).to_owned(),
                    ]
                })
                .collect();
            out.push_str(&table(&["FIGURE", "VALUE", "UNIT", "TARGET", "MET"], &rows));
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn distribution_target_needs_every_sample() {
        let ms = |v: u64| Duration::from_millis(v);
        let t = LatencyTarget {
            p50_ms: Some(20.0),
            p99_ms: Some(50.0),
        };
        let d = Distribution::new("x", &[ms(1), ms(2), ms(3)], 0, Some(t));
        assert_eq!(d.met, Some(true));
        assert_eq!(d.count, 3);
        let d = Distribution::new("x", &[ms(1), ms(2), ms(3)], 1, Some(t));
        assert_eq!(d.met, Some(false), "a timed-out sample fails the target");
        let d = Distribution::new("x", &[ms(1), ms(60)], 0, Some(t));
        assert_eq!(d.met, Some(false));
    }

    #[test]
    fn table_aligns_columns() {
        let mut r = Report::new("demo", Machine::detect("self".into()), "wall clock");
        r.figures
            .push(Figure::new("rate", 51234.5, "events/s").with_target(Target::AtLeast(50000.0)));
        let text = r.render_table();
        assert!(text.contains("FIGURE"), "{text}");
        assert!(text.contains(">= 50000 events/s"), "{text}");
        assert!(text.contains("yes"), "{text}");
    }
}
