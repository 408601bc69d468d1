//! tokenfan's Prometheus `/metrics`, read only when asked (`--metrics`, `idle`): other servers
//! need not have it.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, bail};

/// `GET {target}/metrics`.
pub async fn fetch(client: &reqwest::Client, target: &str) -> anyhow::Result<String> {
    let resp = client
        .get(format!("{target}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .context("GET /metrics")?;
    if !resp.status().is_success() {
        bail!("GET /metrics: {}", resp.status());
    }
    Ok(resp.text().await?)
}

/// Sum of the samples of `name` whose labels contain `label` (`""` = any).
pub fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                && series.contains(label)
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// The counters a run reports (name in the report, metric, label filter).
pub const COUNTERS: &[(&str, &str, &str)] = &[
    (
        "coalesced_events",
        "tokenfan_edge_coalesced_events_total",
        "",
    ),
    (
        "slow_consumer_closes",
        "tokenfan_edge_slow_consumer_closes_total",
        "",
    ),
    (
        "connections_refused",
        "tokenfan_edge_connections_refused_total",
        "",
    ),
    (
        "generator_retries",
        "tokenfan_edge_generator_retries_total",
        "",
    ),
    (
        "streams_done",
        "tokenfan_edge_streams_total",
        "outcome=\"done\"",
    ),
];

/// The [`COUNTERS`] summed over every target's `/metrics` text.
pub fn counters(texts: &[String]) -> BTreeMap<String, f64> {
    COUNTERS
        .iter()
        .map(|(key, name, label)| {
            let sum = texts.iter().map(|t| metric(t, name, label)).sum::<f64>() + 0.0;
            ((*key).to_owned(), sum)
        })
        .collect()
}

/// Every target's `/metrics`; a target that does not answer contributes nothing.
pub async fn fetch_all(client: &reqwest::Client, targets: &[String]) -> (Vec<String>, Vec<String>) {
    let mut texts = Vec::new();
    let mut failures = Vec::new();
    for t in targets {
        match fetch(client, t).await {
            Ok(text) => texts.push(text),
            Err(e) => failures.push(format!("{t}: {e:#}")),
        }
    }
    (texts, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_by_label() {
        let text =
            "# HELP x\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3\nfoo_totalx 9\nfoo_total 1\n";
        assert_eq!(metric(text, "foo_total", ""), 6.0);
        assert_eq!(metric(text, "foo_total", "a=\"2\""), 3.0);
        assert_eq!(metric(text, "bar", ""), 0.0);
    }
}
