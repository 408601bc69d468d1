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

The table gives, per scenario and system, the step held and its figures, CPU per token in µs
(the servers' CPU over the window / tokens received in it); tokenfan's CPU per token as a ratio
to the floor's (bench/peers/floor) at the largest step both held, next to Express's and
Pushpin's; and for the `wrk` scenario (every step measured, pass or not) one row per step and
system with CPU per token against the floor's at the same step and p99 stream time against the
schedule (ttft + (max_tokens - 1) * inter_token).
"""

import json
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def p99(summary):
    return None if not summary else summary.get("p99")


LAG_WARN_MS = 5.0  # the load generator's own warning threshold (report.rs LAG_WARN_MS)


def verdict(result, meta):
    """The step's verdict; a timing failure names the load generator's own lag when it was late."""
    v = timing_verdict(result, meta)
    lag = loadgen_lag_p99(result)
    if v.startswith("fail:") and "ms >" in v and lag is not None and lag > LAG_WARN_MS:
        v += f" (the load generator's event loop was {lag:.0f} ms late at p99: it measured itself too)"
    return v


def timing_verdict(result, meta):
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


def cpu_us_per_token(result):
    """Server CPU per token received in the window, µs (the loadgen's figure, else derived)."""
    if result is None:
        return None
    if result.get("server_cpu_us_per_token") is not None:
        return result["server_cpu_us_per_token"]
    cpu, tokens = server_cpu_pct(result), result.get("total", {}).get("tokens_window")
    wall = (result.get("cpu") or {}).get("wall_secs")
    if cpu is None or not tokens or not wall:
        return None
    return cpu / 100.0 * wall * 1e6 / tokens


def schedule_ms(result):
    cfg = result.get("config", {})
    return cfg.get("ttft_ms", 0) + max(cfg.get("max_tokens", 1) - 1, 0) * cfg.get("inter_token_ms", 0)


def loadgen_lag_p99(result):
    lag = (result or {}).get("loadgen_lag") or {}
    return p99(lag.get("event_loop_delay_ms"))


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
    order_s = ["wrk", "native", "watch", "ws", "longpoll", "shortpoll", "grpc", "idle"]
    order_y = ["tokenfan", "floor", "express", "pushpin", "generator"]
    keys = sorted(groups, key=lambda k: (order_s.index(k[0]) if k[0] in order_s else 99,
                                         order_y.index(k[1]) if k[1] in order_y else 99, k))
    lines = []
    lines += wrk_table(groups)
    stream_keys = [k for k in keys if k[0] not in ("idle", "wrk")]
    if stream_keys:
        if lines:
            lines.append("")
        lines += [
            "| scenario | system | most streams held | tokens/s there | added delay p50 / p99 (ms) "
            "| RSS per connection | server CPU | CPU per token | tokens/s per core | next step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    per_core = {}
    passed = {}  # (scenario, system) -> {concurrency: result} of the steps that passed
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
        passed[key] = {m["concurrency"]: r for m, r in steps
                       if m.get("verdict") == "pass" and r is not None}
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
        us_token = cpu_us_per_token(result)
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
            f"| {fmt(us_token, '{:.1f} µs')} | {fmt(tps_core, '{:,.0f}')} | {nxt} |")
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
    floor_lines = []
    for (scenario, system), steps in sorted(passed.items(), key=lambda kv: (
            order_s.index(kv[0][0]) if kv[0][0] in order_s else 99,
            order_y.index(kv[0][1]) if kv[0][1] in order_y else 99)):
        if system == "floor":
            continue
        floor_steps = passed.get((scenario, "floor"), {})
        common = sorted(set(steps) & set(floor_steps))
        if not common:
            continue
        c = common[-1]
        mine, floor = cpu_us_per_token(steps[c]), cpu_us_per_token(floor_steps[c])
        if mine and floor:
            floor_lines.append(f"{scenario} at {c:,} streams: {system} {mine:.1f} µs per token = "
                               f"{mine / floor:.2f}× the floor's {floor:.1f} µs")
    if floor_lines:
        lines += ["", "CPU per token against the floor (the largest step both held):", ""]
        lines += [f"- {r}" for r in floor_lines]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def wrk_table(groups):
    """One row per wrk step and system: every step is measured, pass or not."""
    rows = []
    floor = {m["concurrency"]: r for m, r in groups.get(("wrk", "floor"), [])}
    order_y = ["tokenfan", "floor", "express", "pushpin", "generator"]
    steps = sorted({m["concurrency"] for (sc, _), ms in groups.items() if sc == "wrk" for m, _ in ms})
    for c in steps:
        for system in sorted((y for (sc, y) in groups if sc == "wrk"),
                             key=lambda y: order_y.index(y) if y in order_y else 99):
            got = [(m, r) for m, r in groups[("wrk", system)] if m["concurrency"] == c]
            if not got:
                continue
            meta, result = got[0]
            verdict = meta.get("verdict", "fail: no result")
            if result is None:
                rows.append(f"| {c:,} | {system} | — | — | — | — | — | — | — | — | — | {verdict} |")
                continue
            total = result.get("total", {})
            us_token = cpu_us_per_token(result)
            floor_us = cpu_us_per_token(floor.get(c))
            ratio = us_token / floor_us if us_token and floor_us else None
            stream = total.get("stream_time_ms") or {}
            sched = schedule_ms(result)
            over = stream.get("p99") / sched if stream.get("p99") and sched else None
            lag = loadgen_lag_p99(result)
            rows.append(
                f"| {c:,} | {system} | {fmt(total.get('tokens_per_sec'), '{:,.0f}')} "
                f"| {fmt(server_cpu_pct(result), '{:.0f} %')} | {fmt(us_token, '{:.1f} µs')} "
                f"| {fmt(ratio, '{:.2f}×')} "
                f"| {fmt(stream.get('p50'), '{:,.0f}')} / {fmt(stream.get('p99'), '{:,.0f}')} "
                f"| {fmt(over, '{:.2f}')} | {fmt(p99(total.get('added_delay_ms')), '{:.1f}')} "
                f"| {result.get('error_total', 0)} / {result.get('violation_total', 0)} "
                f"| {fmt(lag, '{:.1f}')} | {verdict} |")
    if not rows:
        return []
    return [
        "wrk: POST-SSE, each stream a new POST on a kept-alive connection; every step measured",
        "",
        "| streams | system | tokens/s | server CPU | CPU per token | × floor | stream time p50 / p99 (ms) "
        "| p99 ÷ schedule | added delay p99 (ms) | errors / violations | loadgen lag p99 (ms) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] + rows


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
