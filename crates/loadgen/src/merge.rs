//! `merge`: one exact result from the `--json` results of several load generators (the pods
//! of a horizontal load test). Counters are summed; percentiles come from the merged HDR
//! histograms each result carries, never from averaging percentiles. Results of different
//! scenarios, timing or load shape, or of windows that do not coincide, are refused: their sum
//! would not describe one run.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, bail};

use crate::{
    Outcome,
    cli::MergeArgs,
    report::{self, Config, Counts, Part, Report, TransportResult},
    stats::Hists,
};

/// Examples kept in a merged report (as in one run).
const EXAMPLES: usize = 20;

/// Reads the inputs, merges them, prints the text report and writes `--json`.
pub fn run(args: &MergeArgs) -> anyhow::Result<Outcome> {
    if args.max_window_skew_secs.is_nan() || args.max_window_skew_secs < 0.0 {
        bail!("--max-window-skew-secs must be ≥ 0");
    }
    let mut inputs = Vec::new();
    for path in &args.inputs {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Report = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a tokenfan-loadgen result of a streaming scenario",
                path.display()
            )
        })?;
        inputs.push((source_name(path), report));
    }
    let merged = merge(&inputs, args.label.clone(), args.max_window_skew_secs)?;
    if !args.quiet {
        print!("{}", report::text(&merged));
    }
    if let Some(path) = &args.json {
        report::write_json(path, &merged)?;
    }
    Ok(Outcome {
        ok: merged.ok,
        report: Some(merged),
    })
}

fn source_name(p: &Path) -> String {
    p.display().to_string()
}

/// The configuration fields that must be equal for results to merge, by name.
fn must_match(c: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("loop (closed/open)", c.loop_kind.clone()),
        ("duration_secs", c.duration_secs.to_string()),
        ("ramp_secs", c.ramp_secs.to_string()),
        ("warmup_secs", c.warmup_secs.to_string()),
        ("max_tokens", c.max_tokens.to_string()),
        ("ttft_ms", c.ttft_ms.to_string()),
        ("inter_token_ms", c.inter_token_ms.to_string()),
        ("jitter_ms", c.jitter_ms.to_string()),
        ("model", format!("{:?}", c.model)),
        ("emit_times", c.emit_times.to_string()),
        ("allow_coalescing", c.allow_coalescing.to_string()),
        ("viewers", format!("{:?}", c.viewers)),
        ("streams_per_socket", format!("{:?}", c.streams_per_socket)),
        ("poll_timeout_ms", format!("{:?}", c.poll_timeout_ms)),
        ("poll_interval_ms", format!("{:?}", c.poll_interval_ms)),
        ("mix", format!("{:?}", c.mix)),
        ("http", c.http.clone()),
        ("start_at_unix_ms", format!("{:?}", c.start_at_unix_ms)),
    ]
}

/// Checks that every input can be merged with the first one.
fn check(inputs: &[(String, Report)], max_skew_secs: f64) -> anyhow::Result<()> {
    let Some((first_name, first)) = inputs.first() else {
        bail!("nothing to merge");
    };
    for (name, r) in inputs {
        if r.tool != "tokenfan-loadgen" {
            bail!(
                "{name} was not written by tokenfan-loadgen (tool {:?})",
                r.tool
            );
        }
        if let Some((transport, _)) = r.by_transport.iter().find(|(_, t)| t.histograms.is_none()) {
            bail!(
                "{name} carries no histograms for {transport} (written by an older \
                 tokenfan-loadgen?): its percentiles cannot be merged exactly"
            );
        }
        if r.scenario != first.scenario {
            bail!(
                "{name} ran scenario {:?} and {first_name} ran {:?}: only runs of the same \
                 scenario merge",
                r.scenario,
                first.scenario
            );
        }
        for ((field, a), (_, b)) in must_match(&first.config)
            .into_iter()
            .zip(must_match(&r.config))
        {
            if a != b {
                bail!(
                    "{name} and {first_name} differ in {field} ({b} vs {a}): only runs of the same \
                     scenario, timing and load shape merge"
                );
            }
        }
        let skew = (r.window_start_unix_ms - first.window_start_unix_ms).abs() as f64 / 1000.0;
        if skew > max_skew_secs {
            bail!(
                "the measured windows of {name} and {first_name} start {skew:.3} s apart: the \
                 runs did not measure the same window, so their summed tokens/s would mean \
                 nothing. Start every load generator with the same --start-at (or raise \
                 --max-window-skew-secs to merge anyway)"
            );
        }
    }
    Ok(())
}

/// The histograms of a transport result.
fn hists_of(name: &str, transport: &str, t: &TransportResult) -> anyhow::Result<Hists> {
    let encoded = t
        .histograms
        .as_ref()
        .with_context(|| format!("{name}: {transport} has no histograms"))?;
    Hists::decode(encoded).with_context(|| format!("{name}: the histograms of {transport}"))
}

fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Merges results of one horizontal run (see the module docs). `inputs` are (source name,
/// result); a merged result may be merged again.
pub fn merge(
    inputs: &[(String, Report)],
    label: Option<String>,
    max_skew_secs: f64,
) -> anyhow::Result<Report> {
    check(inputs, max_skew_secs)?;
    let (_, first) = &inputs[0];
    let window = first.config.duration_secs;

    // Per transport: counters summed, histograms added (the same bounds everywhere, so the
    // sum is exactly the histogram of every sample of every run).
    let mut transports: BTreeMap<String, (String, Counts, Hists, Option<String>)> = BTreeMap::new();
    for (name, r) in inputs {
        for (key, t) in &r.by_transport {
            let h = hists_of(name, key, t)?;
            let entry = transports.entry(key.clone()).or_insert_with(|| {
                (
                    t.transport.clone(),
                    Counts::default(),
                    Hists::new(),
                    t.added_delay_note.clone(),
                )
            });
            entry.1.add(&Counts::of(t));
            entry.2.add(&h);
        }
    }
    let mut total_counts = Counts::default();
    let mut total_hists = Hists::new();
    let mut by_transport = BTreeMap::new();
    for (key, (describe, counts, hists, note)) in &transports {
        total_counts.add(counts);
        total_hists.add(hists);
        by_transport.insert(
            key.clone(),
            report::transport_result(
                describe.clone(),
                *counts,
                Some(hists),
                window,
                note.as_deref(),
                true,
            ),
        );
    }
    let total_note = if transports.values().all(|t| t.3.is_some()) {
        transports.values().find_map(|t| t.3.clone())
    } else {
        None
    };
    let total = report::transport_result(
        "all".to_owned(),
        total_counts,
        Some(&total_hists),
        window,
        total_note.as_deref(),
        false,
    );

    // The parts: a merged input contributes its own parts, so merging is associative.
    let mut parts = Vec::new();
    for (name, r) in inputs {
        if r.parts.is_empty() {
            parts.push(Part {
                source: name.clone(),
                label: r.label.clone(),
                seed: r.config.seed,
                started_at_unix_ms: r.started_at_unix_ms,
                window_start_unix_ms: r.window_start_unix_ms,
                tokens_per_sec: r.total.tokens_per_sec,
                streams_started: r.total.streams_started,
                error_total: r.error_total,
                violation_total: r.violation_total,
                loadgen_pct_of_core: r.cpu.as_ref().map(|c| c.loadgen_pct_of_core),
                ok: r.ok,
            });
        } else {
            parts.extend(r.parts.iter().cloned());
        }
    }

    let mut config = first.config.clone();
    config.concurrency = 0;
    config.max_in_flight = 0;
    config.threads = 0;
    config.targets.clear();
    config.server_pids.clear();
    config.rate_per_sec = inputs
        .iter()
        .map(|(_, r)| r.config.rate_per_sec)
        .sum::<Option<f64>>();
    let mut errors = BTreeMap::new();
    let mut resumes = BTreeMap::new();
    let mut violations = BTreeMap::new();
    let mut finish_reasons = BTreeMap::new();
    let mut http_versions = BTreeMap::new();
    let mut examples = Vec::new();
    let mut notes = Vec::new();
    let mut server_memory = Vec::new();
    let mut left_in_flight = 0;
    for (name, r) in inputs {
        let c = &r.config;
        config.concurrency += c.concurrency;
        config.max_in_flight += c.max_in_flight;
        config.threads += c.threads;
        for t in &c.targets {
            if !config.targets.contains(t) {
                config.targets.push(t.clone());
            }
        }
        for p in &c.server_pids {
            if !config.server_pids.contains(p) {
                config.server_pids.push(*p);
            }
        }
        add_map(&mut errors, &r.errors);
        add_map(&mut resumes, &r.resumes);
        add_map(&mut violations, &r.violations);
        add_map(&mut finish_reasons, &r.finish_reasons);
        add_map(&mut http_versions, &r.http_versions);
        let prefix = if r.parts.is_empty() {
            format!("[{name}] ")
        } else {
            String::new()
        };
        for e in &r.examples {
            if examples.len() < EXAMPLES {
                examples.push(format!("{prefix}{e}"));
            }
        }
        notes.extend(r.notes.iter().map(|n| format!("{prefix}{n}")));
        server_memory.extend(r.server_memory.iter().cloned());
        left_in_flight += r.left_in_flight;
    }
    if inputs.iter().any(|(_, r)| r.server_counters.is_some()) {
        notes.push(
            "server counters (--metrics) of the parts are not summed: each load generator read \
             the same servers; see the parts' own results"
                .to_owned(),
        );
    }
    let error_total: u64 = errors.values().sum();
    let violation_total: u64 = violations.values().sum();
    let common_label = {
        let labels: Vec<&Option<String>> = inputs.iter().map(|(_, r)| &r.label).collect();
        if labels.iter().all(|l| *l == labels[0]) {
            labels[0].clone()
        } else {
            None
        }
    };
    Ok(Report {
        tool: first.tool.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        label: label.or(common_label),
        scenario: first.scenario.clone(),
        config,
        started_at_unix_ms: inputs
            .iter()
            .map(|(_, r)| r.started_at_unix_ms)
            .min()
            .unwrap_or_default(),
        window_start_unix_ms: inputs
            .iter()
            .map(|(_, r)| r.window_start_unix_ms)
            .min()
            .unwrap_or_default(),
        run_secs: inputs.iter().map(|(_, r)| r.run_secs).fold(0.0, f64::max),
        window_secs: window,
        total,
        by_transport,
        http_versions,
        errors,
        error_total,
        resumes,
        violations,
        violation_total,
        finish_reasons,
        examples,
        notes,
        // One process's CPU figure means nothing for the sum; the parts keep theirs.
        cpu: None,
        server_cpu_us_per_token: None,
        // Each load generator's own lag is its own (a part's result file has it).
        loadgen_lag: None,
        server_memory,
        server_counters: None,
        left_in_flight,
        ok: error_total == 0 && violation_total == 0 && left_in_flight == 0,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Summary, new_hist};

    /// A deterministic spread of samples, µs.
    fn samples(n: u64, seed: u64) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = crate::ctx::mix(x);
                // 50 µs … ~3 s, heavy-tailed.
                50 + (x % 1000) * (x % 3000) + (x >> 60) * 100_000
            })
            .collect()
    }

    fn part(values: &[u64], tokens: u64) -> TransportResult {
        let mut h = Hists::new();
        for v in values {
            h.ttft.record(*v).expect("in range");
            h.itl.record(*v / 3 + 1).expect("in range");
            h.delay.record(*v / 7 + 1).expect("in range");
            h.delay_all.record(*v / 7 + 1).expect("in range");
        }
        let counts = Counts {
            streams_started: values.len() as u64,
            tokens_window: tokens,
            ..Counts::default()
        };
        report::transport_result("native".into(), counts, Some(&h), 10.0, None, true)
    }

    fn report_with(t: TransportResult, window_start_unix_ms: i64) -> Report {
        let json = serde_json::json!({
            "tool": "tokenfan-loadgen", "version": "0", "label": "x", "scenario": "native",
            "config": {
                "targets": ["http://a"], "loop_kind": "closed", "concurrency": 2,
                "rate_per_sec": null, "max_in_flight": 10, "duration_secs": 10.0,
                "ramp_secs": 1.0, "warmup_secs": 1.0, "max_tokens": 10, "ttft_ms": 1,
                "inter_token_ms": 1, "jitter_ms": 0, "seed": 1, "model": null,
                "emit_times": true, "allow_coalescing": false, "stream_timeout_secs": 9.0,
                "viewers": null, "streams_per_socket": null, "poll_timeout_ms": null,
                "poll_interval_ms": null, "grpc_connections": null, "mix": {"native": 1},
                "threads": 1, "server_pids": []
            },
            "started_at_unix_ms": 0, "window_start_unix_ms": window_start_unix_ms,
            "run_secs": 12.0, "window_secs": 10.0,
            "total": t.clone(), "by_transport": {"native": t},
            "errors": {"http_503": 1}, "error_total": 1,
            "violations": {"lost": 0}, "violation_total": 0, "finish_reasons": {"stop": 2},
            "examples": [], "notes": [], "cpu": null, "server_memory": [],
            "server_counters": null, "left_in_flight": 0, "ok": false
        });
        serde_json::from_value(json).expect("a report")
    }

    /// Samples split over three "runs" (through JSON, as files carry them) merge into exactly
    /// the histogram of all the samples: the same count, percentiles, max and mean.
    #[test]
    fn split_samples_merge_exactly() {
        let all = samples(30_000, 7);
        let (a, rest) = all.split_at(4_000);
        let (b, c) = rest.split_at(16_000);
        let inputs: Vec<(String, Report)> = [(a, 10u64), (b, 20), (c, 30)]
            .iter()
            .enumerate()
            .map(|(i, (values, tokens))| {
                let r = report_with(part(values, *tokens), 1_000 + i as i64);
                let text = serde_json::to_string(&r).expect("serializes");
                (
                    format!("run{i}.json"),
                    serde_json::from_str(&text).expect("parses"),
                )
            })
            .collect();
        let merged = merge(&inputs, None, 1.0).expect("merges");
        let mut union = new_hist();
        for v in &all {
            union.record(*v).expect("in range");
        }
        let want = Summary::of(&union).expect("samples");
        let got = merged.by_transport["native"].ttft_ms.clone().expect("ttft");
        assert_eq!(got.count, 30_000);
        assert_eq!(
            (got.p50, got.p90, got.p99, got.p999, got.max, got.mean),
            (want.p50, want.p90, want.p99, want.p999, want.max, want.mean)
        );
        assert_eq!(got.quantiles, want.quantiles);
        let total = merged.total.ttft_ms.clone().expect("total ttft");
        assert_eq!(total.quantiles, want.quantiles);
        // The merged histogram itself is the union's, bucket for bucket.
        let h = Hists::decode(
            merged.by_transport["native"]
                .histograms
                .as_ref()
                .expect("hists"),
        )
        .expect("decodes");
        assert_eq!(h.ttft, union);
        // Counters are sums; tokens/s is over the one shared window.
        assert_eq!(merged.total.streams_started, 30_000);
        assert_eq!(merged.total.tokens_window, 60);
        assert!((merged.total.tokens_per_sec - 6.0).abs() < 1e-9);
        assert_eq!(merged.errors["http_503"], 3);
        assert_eq!(merged.error_total, 3);
        assert_eq!(merged.config.concurrency, 6);
        assert_eq!(merged.parts.len(), 3);
        assert!(!merged.ok);
        // Merging is associative: (a + b) + c = a + b + c.
        let ab = merge(&inputs[..2], None, 1.0).expect("merges");
        let abc = merge(&[("ab".into(), ab), inputs[2].clone()], None, 1.0).expect("merges");
        assert_eq!(
            abc.by_transport["native"].histograms,
            merged.by_transport["native"].histograms
        );
        assert_eq!(abc.parts.len(), 3);
        assert_eq!(abc.error_total, 3);
    }

    #[test]
    fn mismatches_are_refused_with_the_reason() {
        let a = report_with(part(&[100, 200], 1), 1_000);
        let mut b = report_with(part(&[300], 1), 1_200);
        b.config.inter_token_ms = 20;
        let err = merge(&[("a".into(), a.clone()), ("b".into(), b)], None, 1.0)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("inter_token_ms"), "{err}");

        let mut c = report_with(part(&[300], 1), 1_000);
        c.scenario = "ws".into();
        let err = merge(&[("a".into(), a.clone()), ("c".into(), c)], None, 1.0)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("scenario"), "{err}");

        let d = report_with(part(&[300], 1), 9_000);
        let err = merge(
            &[("a".into(), a.clone()), ("d".into(), d.clone())],
            None,
            1.0,
        )
        .expect_err("refused")
        .to_string();
        assert!(err.contains("--start-at"), "{err}");
        assert!(
            merge(
                &[("a".into(), a.clone()), ("d".into(), d)],
                None,
                f64::INFINITY
            )
            .is_ok()
        );

        let mut e = report_with(part(&[300], 1), 1_000);
        if let Some(t) = e.by_transport.get_mut("native") {
            t.histograms = None;
        }
        let err = merge(&[("a".into(), a), ("e".into(), e)], None, 1.0)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("no histograms"), "{err}");
    }
}
