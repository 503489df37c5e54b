//! The alert rules and the dashboard of `bundle/`: every expression is
//! read by `promtool` (the rules as they are, the dashboard's queries as
//! recording rules, with its variables given values), the rules' own tests
//! pass (an alert that fires, a case that does not, for each), and every
//! metric they name is one `docs/metrics.md` describes.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::{can_run, promtool, Need};

fn bundle(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bundle")
        .join(path)
}

/// Every `expr` of the dashboard's panels, with its variables given values
/// a query can take.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(bundle("grafana/xtcp-services.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queries.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$instance", ".*")
                    .replace("$service", ".*"),
            );
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["query"]["query"].as_str() {
            // label_values(SELECTOR, LABEL) is Grafana's: its selector is PromQL.
            let selector = q.strip_prefix("label_values(").unwrap();
            let selector = &selector[..selector.rfind(',').unwrap()];
            queries.push(selector.replace("$instance", ".*"));
        }
    }
    queries
}

/// The metric names an expression reads (a histogram's by its base name).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("xtcp_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.push(base.to_string());
    }
    names
}

#[test]
fn the_alert_rules_and_the_dashboard_read_as_prometheus_reads_them() {
    if !can_run(&[Need::Tool("promtool")]) {
        return;
    }
    let rules = bundle("prometheus/xtcp-alerts.yml");
    promtool(&["check", "rules", rules.to_str().unwrap()], "");
    let tests = bundle("prometheus/xtcp-alerts.test.yml");
    promtool(&["test", "rules", tests.to_str().unwrap()], "");

    let queries = dashboard_queries();
    assert!(queries.len() >= 12, "{queries:?}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yml");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = serde_json::to_string(q).unwrap();
        yaml.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {q}\n"
        ));
    }
    std::fs::write(&file, yaml).unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()], "");

    let doc = include_str!("../../docs/metrics.md");
    let alerts = std::fs::read_to_string(&rules).unwrap();
    for expr in queries.iter().map(String::as_str).chain([alerts.as_str()]) {
        for name in metric_names(expr) {
            let row = format!("| `{name}` ");
            assert!(
                doc.contains(&row),
                "{name} (in `{expr}`) is not in docs/metrics.md"
            );
        }
    }
}
