//! The provisioned Grafana dashboards (`deploy/grafana/dashboards/*.json`)
//! and the metric names their PromQL queries use.
//!
//! Include it from a test file with
//! `#[path = "common/dashboards.rs"] mod dashboards;`.
//!
//! Two views of the names are offered:
//!
//! - [`metric_names_in_dashboards`]: the series names exactly as written in
//!   the queries, e.g. `ai_team_task_duration_seconds_bucket` — what a live
//!   `/metrics` scrape must contain, sample by sample.
//! - [`metric_families_in_dashboards`]: the same with one `_bucket`, `_sum`
//!   or `_count` suffix removed ([`metric_family`]), e.g.
//!   `ai_team_task_duration_seconds` — what a `# TYPE` line of the exposition
//!   names. The suffix is stripped blindly: only use families to match
//!   histogram (or summary) names, since a counter whose own name ends in
//!   `_count` would be shortened too.
//!
//! The extractor ([`metric_names_in_expr`]) is a small PromQL scanner, not a
//! full parser: it skips string literals, label matchers (`{...}`), range and
//! subquery selectors (`[...]`), Grafana variables (`$__range`, `${agent}`),
//! number and duration literals and the label lists of `by`, `without`,
//! `on`, `ignoring`, `group_left` and `group_right`; of the identifiers left,
//! those followed by `(` are function calls and the PromQL keywords,
//! aggregation operators and set operators are dropped. Whatever remains is a
//! metric name. A `{__name__="..."}` matcher contributes its name too.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `deploy/grafana/dashboards/` of this repository.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards")
}

/// Every dashboard file (`*.json`) of [`dashboards_dir`], sorted.
pub fn dashboard_files() -> Vec<PathBuf> {
    let dir = dashboards_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

/// Parses one dashboard file.
pub fn load_dashboard(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Every panel of a dashboard, rows included, depth first: the top-level
/// `panels` and the `panels` nested in (collapsed) rows or library panels.
pub fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        if let Some(list) = panels.as_array() {
            for panel in list {
                out.push(panel);
                walk(&panel["panels"], out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `targets[].expr` of every panel of a dashboard (nested ones too), in
/// panel order. A target without a string `expr` gives an empty string, so
/// that callers can reject it.
pub fn exprs_of(dashboard: &Value) -> Vec<String> {
    all_panels(dashboard)
        .into_iter()
        .filter_map(|panel| panel["targets"].as_array())
        .flatten()
        .map(|target| target["expr"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `(file, expr)` for every query of every dashboard.
pub fn dashboard_exprs() -> Vec<(PathBuf, String)> {
    dashboard_files()
        .into_iter()
        .flat_map(|file| {
            let exprs = exprs_of(&load_dashboard(&file));
            exprs.into_iter().map(move |e| (file.clone(), e))
        })
        .collect()
}

/// One query of a dashboard panel.
pub struct PanelQuery {
    /// The dashboard file's name, e.g. `task-overview.json`.
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
    /// The dashboard's template variables, each with the value Grafana
    /// sends for "All" (`allValue`).
    pub variables: Vec<(String, String)>,
}

impl PanelQuery {
    /// The query as Grafana sends it to Prometheus: `$__range`,
    /// `$__rate_interval` and `$__interval` replaced by the given windows
    /// and every variable (`$name`, `${name}`) by its "All" value. Panics
    /// if a `$` is left (an unknown variable would send invalid PromQL).
    pub fn instantiate(&self, range: &str, rate_interval: &str, interval: &str) -> String {
        let mut vars: Vec<(String, &str)> = vec![
            ("__rate_interval".to_owned(), rate_interval),
            ("__interval".to_owned(), interval),
            ("__range".to_owned(), range),
        ];
        vars.extend(self.variables.iter().map(|(n, v)| (n.clone(), v.as_str())));
        // Longest names first, so that `$__interval` does not eat
        // `$__interval_ms`.
        vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
        let mut out = self.expr.clone();
        for (name, value) in vars {
            out = out.replace(&format!("${{{name}}}"), value);
            out = out.replace(&format!("${name}"), value);
        }
        assert!(
            !out.contains('$'),
            "{} / {}: a variable is left in {out}",
            self.dashboard,
            self.panel
        );
        out
    }
}

/// The template variables of a dashboard with the value Grafana sends when
/// "All" is selected. Panics on a variable that has no "All" value (the
/// tests would not know what to send).
pub fn all_values(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let name = v["name"].as_str().expect("a variable has a name");
            assert!(v["includeAll"] == true, "variable {name} has no All option");
            let all = v["allValue"]
                .as_str()
                .unwrap_or_else(|| panic!("variable {name} has no allValue"));
            (name.to_owned(), all.to_owned())
        })
        .collect()
}

/// Every query of every dashboard, with its panel's title and the
/// dashboard's variables.
pub fn panel_queries() -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for file in dashboard_files() {
        let dashboard = load_dashboard(&file);
        let variables = all_values(&dashboard);
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for panel in all_panels(&dashboard) {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    dashboard: name.clone(),
                    panel: panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr: target["expr"].as_str().unwrap_or_default().to_owned(),
                    variables: variables.clone(),
                });
            }
        }
    }
    out
}

/// The variable queries of every dashboard (`label_values(metric, label)`),
/// as `(metric, label)`.
pub fn label_values_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in dashboard_files() {
        let dashboard = load_dashboard(&file);
        for v in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unhandled variable query {q}"));
            let (metric, label) = inner
                .split_once(',')
                .unwrap_or_else(|| panic!("label_values without a metric: {q}"));
            out.push((metric.trim().to_owned(), label.trim().to_owned()));
        }
    }
    out
}

/// The metric (series) names used by the dashboards, exactly as written:
/// histogram series keep their `_bucket` / `_sum` / `_count` suffix.
pub fn metric_names_in_dashboards() -> BTreeSet<String> {
    dashboard_exprs()
        .iter()
        .flat_map(|(_, expr)| metric_names_in_expr(expr))
        .collect()
}

/// The metric families used by the dashboards: [`metric_names_in_dashboards`]
/// passed through [`metric_family`].
pub fn metric_families_in_dashboards() -> BTreeSet<String> {
    metric_names_in_dashboards()
        .iter()
        .map(|name| metric_family(name).to_owned())
        .collect()
}

/// The family of a series name: without one trailing `_bucket`, `_sum` or
/// `_count` (see the module documentation for when that is meaningful).
pub fn metric_family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .unwrap_or(name)
}

/// PromQL words that are never metric names when they appear bare:
/// aggregation operators, keywords, set operators and literals. Functions are
/// recognised by the `(` that follows them, but are listed too so that
/// `sum by (x) (...)`, `sum without (x) (...)` and friends are handled.
const KEYWORDS: &[&str] = &[
    // aggregation operators
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // modifiers and operators
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    // literals
    "inf",
    "nan",
    // common functions
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "predict_linear",
    "histogram_quantile",
    "histogram_avg",
    "histogram_count",
    "histogram_sum",
    "histogram_fraction",
    "histogram_stddev",
    "histogram_stdvar",
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "floor",
    "round",
    "clamp",
    "clamp_min",
    "clamp_max",
    "changes",
    "resets",
    "exp",
    "ln",
    "log2",
    "log10",
    "sqrt",
    "scalar",
    "vector",
    "sort",
    "sort_desc",
    "sort_by_label",
    "sort_by_label_desc",
    "label_replace",
    "label_join",
    "time",
    "timestamp",
    "minute",
    "hour",
    "day_of_week",
    "day_of_month",
    "day_of_year",
    "days_in_month",
    "month",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "holt_winters",
    "double_exponential_smoothing",
    "sgn",
    "start",
    "end",
    // the histogram bucket label, should it ever appear bare
    "le",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal that starts at `start` (a `"`, `'` or
/// backquote); backslash escapes are honoured except in raw backquoted strings.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    chars.len()
}

/// Index just past the bracket opened at `start`, skipping string literals.
fn skip_group(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    chars.len()
}

fn unquote(literal: &[char]) -> String {
    let inner = &literal[1..literal.len().saturating_sub(1).max(1)];
    let mut out = String::new();
    let mut chars = inner.iter();
    while let Some(&c) = chars.next() {
        if c == '\\' && literal[0] != '`' {
            if let Some(&next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `__name__="x"` matchers of a label-matcher block `{...}` (given without
/// its braces).
fn names_in_matchers(block: &[char], out: &mut BTreeSet<String>) {
    let mut i = 0;
    while i < block.len() {
        let c = block[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(block, i);
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < block.len() && is_ident_char(block[i]) {
                i += 1;
            }
            let label: String = block[start..i].iter().collect();
            let mut j = i;
            while j < block.len() && block[j].is_whitespace() {
                j += 1;
            }
            // Only the equality matcher names one metric.
            if label == "__name__"
                && block.get(j) == Some(&'=')
                && !matches!(block.get(j + 1), Some('~' | '='))
            {
                j += 1;
                while j < block.len() && block[j].is_whitespace() {
                    j += 1;
                }
                if matches!(block.get(j), Some('"' | '\'' | '`')) {
                    let end = skip_string(block, j);
                    out.insert(unquote(&block[j..end]));
                    i = end;
                }
            }
            continue;
        }
        i += 1;
    }
}

/// The metric names a PromQL expression selects, as written (see the module
/// documentation for what is and is not recognised).
pub fn metric_names_in_expr(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '#' => {
                // A comment runs to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                let end = skip_group(&chars, i, '{', '}');
                names_in_matchers(&chars[i + 1..end.saturating_sub(1).max(i + 1)], &mut out);
                i = end;
            }
            '[' => i = skip_group(&chars, i, '[', ']'),
            '$' => {
                // Grafana variable: $name, ${name} or ${name:format}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}');
                } else {
                    while i < chars.len() && is_ident_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Number or duration literal: 0.95, 1e3, 0x1f, 5m, 1h30m.
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
                {
                    // An exponent sign: 1e-3.
                    if matches!(chars[i], 'e' | 'E') && matches!(chars.get(i + 1), Some('+' | '-'))
                    {
                        i += 1;
                    }
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let followed_by_paren = chars.get(next) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if followed_by_paren {
                        i = skip_group(&chars, next, '(', ')');
                    }
                } else if followed_by_paren || KEYWORDS.contains(&lower.as_str()) {
                    // A function call, an aggregation or a keyword.
                } else {
                    out.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}
