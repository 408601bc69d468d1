#!/usr/bin/env python3
"""Verdicts and the summary table of scripts/bench.sh (standard library only).

    summarize.py verdict RESULT.json META.json   -> "pass" or "fail: <why>"
    summarize.py table RESULTS_DIR                -> markdown table on stdout (also summary.md)
    summarize.py charts RESULTS_DIR               -> "scenario file..." lines: what to chart

RESULT.json is tokenfan-loadgen's --json report of one step; META.json is what bench.sh measured
beside it (the server's resident memory before the load and in the middle of the measured window,
open client connections then, the limits in force). A step passes when:

  1. the load generator counted 0 errors and 0 verification violations;
  2. the added delay (receipt - emitted_at) has p99 <= limit;
  3. time to first token has p99 <= requested ttft + limit;
  4. the inter-token gap as received has p99 <= requested gap + limit (not for short-poll, whose
     gaps are the poll interval by design).

limit is P99_LIMIT_MS (50 ms), plus the poll interval for short-poll. Checks 3 and 4 are there
because emitted_at is stamped when the generator actually emits: a server whose own token timer
falls behind its schedule would otherwise look fast.
"""

import json
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def p99(summary):
    return None if not summary else summary.get("p99")


def verdict(result, meta):
    limit = meta["limit_ms"]
    total = result.get("total", {})
    cfg = result.get("config", {})
    errors = result.get("error_total", 0)
    violations = result.get("violation_total", 0)
    if errors or violations:
        kinds = {k: v for k, v in result.get("errors", {}).items() if v}
        kinds.update({k: v for k, v in result.get("violations", {}).items() if v})
        top = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
        return f"fail: {errors} errors, {violations} violations ({top})"
    if meta.get("loadgen_rc", 0) not in (0, None):
        return f"fail: loadgen exited {meta['loadgen_rc']}"
    added = p99(total.get("added_delay_ms"))
    if added is None:
        return "fail: no added-delay samples"
    if added > limit:
        return f"fail: added delay p99 {added:.1f} ms > {limit:.0f} ms"
    ttft = p99(total.get("ttft_ms"))
    ttft_limit = cfg.get("ttft_ms", 0) + limit
    if ttft is not None and ttft > ttft_limit:
        return f"fail: time to first token p99 {ttft:.1f} ms > {ttft_limit:.0f} ms"
    if meta["scenario"] != "shortpoll":
        gap = p99(total.get("inter_token_ms"))
        gap_limit = cfg.get("inter_token_ms", 0) + limit
        if gap is not None and gap > gap_limit:
            return f"fail: inter-token gap p99 {gap:.1f} ms > {gap_limit:.0f} ms"
    if total.get("tokens_window", 0) == 0:
        return "fail: no tokens in the window"
    return "pass"


def server_cpu_pct(result):
    cpu = result.get("cpu") or {}
    vals = [s.get("pct_of_core") for s in cpu.get("servers", []) if s.get("pct_of_core") is not None]
    return sum(vals) if vals else None


def step_rows(results_dir):
    rows = []
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".meta.json"):
            continue
        meta = load(os.path.join(results_dir, name))
        result_path = os.path.join(results_dir, meta["result"])
        result = load(result_path) if os.path.exists(result_path) else None
        rows.append((meta, result))
    return rows


def fmt(v, spec="{:.1f}", none="—"):
    return none if v is None else spec.format(v)


def table(results_dir):
    groups = {}
    for meta, result in step_rows(results_dir):
        groups.setdefault((meta["scenario"], meta["system"]), []).append((meta, result))
    order_s = ["native", "watch", "ws", "longpoll", "shortpoll", "grpc", "idle"]
    order_y = ["tokenfan", "express", "pushpin", "generator"]
    keys = sorted(groups, key=lambda k: (order_s.index(k[0]) if k[0] in order_s else 99,
                                         order_y.index(k[1]) if k[1] in order_y else 99, k))
    lines = []
    stream_keys = [k for k in keys if k[0] != "idle"]
    if stream_keys:
        lines += [
            "| scenario | system | most streams held | tokens/s there | added delay p50 / p99 (ms) "
            "| RSS per connection | server CPU | CPU per 1,000 tokens/s | tokens/s per core | next step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    per_core = {}
    for key in stream_keys:
        steps = sorted(groups[key], key=lambda mr: mr[0]["concurrency"])
        held = None
        failed = None
        for meta, result in steps:
            v = meta.get("verdict", "fail: no result")
            if v == "pass" and result is not None:
                held = (meta, result)
            else:
                failed = (meta, v)
                break
        scenario, system = key
        viewers = steps[0][0].get("viewers")
        if held is None:
            why = failed[1] if failed else "no step ran"
            lines.append(f"| {scenario} | {system} | none ({failed[0]['concurrency'] if failed else '—'} failed) "
                         f"| — | — | — | — | — | — | {why} |")
            continue
        meta, result = held
        total = result["total"]
        tps = total.get("tokens_per_sec")
        added = total.get("added_delay_ms") or {}
        cpu = server_cpu_pct(result)
        conns = meta.get("connections_mid")
        rss = None
        if conns and meta.get("rss_mid_kib") is not None and meta.get("rss_base_kib") is not None:
            rss = (meta["rss_mid_kib"] - meta["rss_base_kib"]) / conns
        cpu_per_k = cpu / (tps / 1000.0) if cpu and tps else None
        tps_core = tps / (cpu / 100.0) if cpu and tps else None
        per_core[key] = tps_core
        held_txt = f"{meta['concurrency']:,}"
        if scenario == "watch" and viewers:
            held_txt += f" × {viewers} viewers"
        nxt = f"{failed[0]['concurrency']:,}: {failed[1][6:]}" if failed else "all steps passed"
        lines.append(
            f"| {scenario} | {system} | {held_txt} | {fmt(tps, '{:,.0f}')} "
            f"| {fmt(added.get('p50'), '{:.2f}')} / {fmt(added.get('p99'), '{:.1f}')} "
            f"| {fmt(rss, '{:.1f} KiB')} ({fmt(conns, '{:,}')} conns) | {fmt(cpu, '{:.0f} %')} "
            f"| {fmt(cpu_per_k, '{:.2f} % of a core')} | {fmt(tps_core, '{:,.0f}')} | {nxt} |")
    idle_keys = [k for k in keys if k[0] == "idle"]
    if idle_keys:
        lines += ["", "| idle SSE connections | system | RSS before → with them | per connection |",
                  "|---|---|---|---|"]
        for key in idle_keys:
            for meta, _ in groups[key]:
                conns = meta.get("connections_mid")
                base, mid = meta.get("rss_base_kib"), meta.get("rss_mid_kib")
                per = (mid - base) / conns if conns and base is not None and mid is not None else None
                lines.append(f"| {fmt(conns, '{:,}')} | {key[1]} | {fmt(base, '{:,} KiB')} → "
                             f"{fmt(mid, '{:,} KiB')} | {fmt(per, '{:.2f} KiB')} |")
    ratios = []
    for (scenario, system), v in per_core.items():
        if system != "tokenfan" or not v:
            continue
        for peer in ("express", "pushpin"):
            pv = per_core.get((scenario, peer))
            if pv:
                ratios.append(f"{scenario}: tokenfan delivers {v / pv:.1f}× the tokens/s per core of {peer}")
    if ratios:
        lines += ["", "At the most streams each held (tokens/s divided by the server's share of its core):", ""]
        lines += [f"- {r}" for r in ratios]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def charts(results_dir):
    """Per scenario, the result of each system's last passing step (else its first step)."""
    groups = {}
    for meta, result in step_rows(results_dir):
        if result is None or meta["scenario"] == "idle":
            continue
        groups.setdefault(meta["scenario"], {}).setdefault(meta["system"], []).append(meta)
    out = []
    for scenario, systems in groups.items():
        files = []
        for system, metas in systems.items():
            metas.sort(key=lambda m: m["concurrency"])
            pick = metas[0]
            for m in metas:
                if m.get("verdict") == "pass":
                    pick = m
                else:
                    break
            files.append(os.path.join(results_dir, pick["result"]))
        out.append(scenario + " " + " ".join(files))
    return "\n".join(out)


def main(argv):
    if len(argv) == 4 and argv[1] == "verdict":
        meta = load(argv[3])
        try:
            result = load(argv[2])
        except (OSError, ValueError) as e:
            print(f"fail: no result ({e.__class__.__name__})")
            return 0
        print(verdict(result, meta))
        return 0
    if len(argv) == 3 and argv[1] == "table":
        sys.stdout.write(table(argv[2]))
        return 0
    if len(argv) == 3 and argv[1] == "charts":
        print(charts(argv[2]))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
