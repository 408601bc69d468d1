#!/usr/bin/env python3
"""Checks the Grafana dashboards of deploy/ against what tokenfan really exports.

    check_dashboard_metrics.py [--edge BIN] [--generator BIN] [--source DIR] DASHBOARD.json...

1. Parses each dashboard and collects every PromQL expression (panels, nested rows, template
   variables) and every datasource uid, which must be one that deploy/grafana provisions.
2. Starts tokenfan-generator and tokenfan-edge (pointed at that generator) on free loopback
   ports, runs one stream through the edge and reads it again over SSE resume, long-poll and
   short-poll, then scrapes both /metrics.
3. Every `tokenfan_*` name in an expression must be exported (a histogram's `_bucket`, `_sum`
   and `_count` count as its family). Metrics that only appear after a rare event (an owner
   failover, a backend error, a slow consumer) are accepted when their exact name is still
   registered in the Rust sources, and listed as such. Label names used in `{...}` matchers
   and `by (...)` clauses must exist on the metric (plus `instance` and `job`, which
   Prometheus adds).
Prints one line per finding and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROVISIONED_UIDS_FILE = ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml"
# Labels Prometheus attaches at scrape time, and `le` of histogram buckets.
SCRAPE_LABELS = {"instance", "job"}
METRIC_RE = re.compile(r"\b(tokenfan_[A-Za-z0-9_:]+)")
SELECTOR_RE = re.compile(r"\b(tokenfan_[A-Za-z0-9_:]+)\s*\{([^}]*)\}")
MATCHER_KEY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


class Failures:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def ok(self, msg: str) -> None:
        self.passed += 1
        print(f"ok    {msg}")

    def fail(self, msg: str) -> None:
        self.failed += 1
        print(f"FAIL  {msg}")


# --------------------------------------------------------------------------- dashboards


def walk_panels(panels):
    for panel in panels or []:
        yield panel
        yield from walk_panels(panel.get("panels"))


def dashboard_queries(dash: dict) -> tuple[list[tuple[str, str]], set[str]]:
    """(where, PromQL) pairs and the datasource uids the dashboard refers to."""
    exprs: list[tuple[str, str]] = []
    uids: set[str] = set()

    def note_ds(ds):
        if isinstance(ds, dict) and ds.get("uid"):
            uids.add(ds["uid"])

    for panel in walk_panels(dash.get("panels")):
        note_ds(panel.get("datasource"))
        for target in panel.get("targets") or []:
            note_ds(target.get("datasource"))
            if target.get("expr"):
                exprs.append((f'panel "{panel.get("title", "?")}"', target["expr"]))
    for var in (dash.get("templating") or {}).get("list") or []:
        note_ds(var.get("datasource"))
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query:
            exprs.append((f'variable "{var.get("name", "?")}"', query))
    return exprs, uids


def provisioned_uids() -> set[str]:
    # A tiny reader for `uid: <value>` lines: no YAML library needed.
    text = PROVISIONED_UIDS_FILE.read_text()
    return set(re.findall(r"^\s*uid:\s*([A-Za-z0-9_-]+)\s*$", text, re.M))


# --------------------------------------------------------------------------- exposition


def parse_exposition(text: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Sample names → label names, and family → type (from # TYPE lines)."""
    samples: dict[str, set[str]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{([^}]*)\})?\s", line)
        if not m:
            continue
        labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', m.group(3) or ""))
        samples.setdefault(m.group(1), set()).update(labels)
    return samples, types


def family_of(name: str, types: dict[str, str]) -> str | None:
    for suffix in HIST_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if types.get(base) in ("histogram", "summary"):
                return base
    return None


def source_literals(src_dirs: list[pathlib.Path]) -> str:
    chunks = []
    for d in src_dirs:
        for path in sorted(d.rglob("*.rs")):
            chunks.append(path.read_text(errors="replace"))
    return "\n".join(chunks)


# --------------------------------------------------------------------------- processes


def wait_log_fields(log: pathlib.Path, proc: subprocess.Popen, message: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before logging {message!r}")
        for line in log.read_text(errors="replace").splitlines():
            try:
                fields = json.loads(line).get("fields", {})
            except ValueError:
                continue
            if fields.get("message") == message:
                return fields
        time.sleep(0.05)
    raise RuntimeError(f"no {message!r} log line within {timeout:.0f} s")


def http(url: str, method: str = "GET", body: bytes | None = None, headers=None, timeout=15):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered 200")
        try:
            if http(url, timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def exercise(edge: str) -> None:
    """One stream over POST SSE, then read again by SSE resume, long-poll and short-poll."""
    body = json.dumps(
        {"prompt": "deploy check", "max_tokens": 8, "seed": 7,
         "timing": {"ttft_ms": 5, "inter_token_ms": 2}}
    ).encode()
    status, headers, data = http(
        f"{edge}/v1/streams", "POST", body,
        {"content-type": "application/json", "accept": "text/event-stream"},
    )
    stream_id = {k.lower(): v for k, v in headers.items()}.get("x-stream-id")
    if status != 200 or not stream_id or b'"type":"done"' not in data:
        raise RuntimeError(f"POST /v1/streams answered {status} without a finished stream")
    status, _, data = http(f"{edge}/v1/streams/{stream_id}/events", headers={"last-event-id": "3"})
    if status != 200 or b'"type":"done"' not in data:
        raise RuntimeError(f"SSE resume answered {status}")
    status, _, _ = http(f"{edge}/v1/streams/{stream_id}/poll?after=0&timeout_ms=1000")
    if status != 200:
        raise RuntimeError(f"long-poll answered {status}")
    status, _, _ = http(f"{edge}/v1/streams/{stream_id}?after=0")
    if status != 200:
        raise RuntimeError(f"short-poll answered {status}")


def scrape(edge_bin: str, generator_bin: str) -> tuple[str, str]:
    work = pathlib.Path(tempfile.mkdtemp(prefix="tokenfan-dash-"))
    procs: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TOKENFAN_", "OTEL_EXPORTER_OTLP_"))}
    try:
        gen_log = work / "generator.log"
        with open(gen_log, "wb") as out:
            gen = subprocess.Popen(
                [generator_bin, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                 "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=out, env=env)
        procs.append(gen)
        fields = wait_log_fields(gen_log, gen, "tokenfan-generator listening", 30)
        grpc, gen_metrics = fields["grpc"], fields["metrics"]
        wait_ready(f"http://{gen_metrics}/metrics", gen, 30)

        edge_log = work / "edge.log"
        with open(edge_log, "wb") as out:
            edge = subprocess.Popen(
                [edge_bin, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                 "--generator", f"http://{grpc}", "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=out, env=env)
        procs.append(edge)
        fields = wait_log_fields(edge_log, edge, "tokenfan-edge listening", 30)
        edge_url = f"http://{fields['addr']}"
        admin_url = f"http://{fields['admin_addr']}"
        wait_ready(f"{admin_url}/readyz", edge, 30)

        exercise(edge_url)
        edge_text = http(f"{admin_url}/metrics")[2].decode()
        gen_text = http(f"http://{gen_metrics}/metrics")[2].decode()
        return edge_text, gen_text
    except Exception:
        for log in sorted(work.glob("*.log")):
            sys.stderr.write(f"--- {log.name} (last lines)\n")
            sys.stderr.write("\n".join(log.read_text(errors="replace").splitlines()[-20:]) + "\n")
        raise
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboards", nargs="+", type=pathlib.Path)
    ap.add_argument("--edge", default=str(ROOT / "target/debug/tokenfan-edge"))
    ap.add_argument("--generator", default=str(ROOT / "target/debug/tokenfan-generator"))
    ap.add_argument("--source", action="append", type=pathlib.Path,
                    help="Rust source directories searched for metric names "
                         "(default: crates/*/src)")
    args = ap.parse_args()
    f = Failures()

    for binary in (args.edge, args.generator):
        if not os.access(binary, os.X_OK):
            f.fail(f"{binary} is missing: build it first (cargo build -p tokenfan-edge "
                   "-p tokenfan-generator)")
            print(f"{f.passed} passed, {f.failed} failed")
            return 1

    queries: list[tuple[str, str, str]] = []
    uids_ok = provisioned_uids()
    for path in args.dashboards:
        try:
            dash = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            f.fail(f"{path}: not valid JSON: {err}")
            continue
        exprs, uids = dashboard_queries(dash)
        f.ok(f"{path.name}: valid JSON, {len(exprs)} PromQL expressions")
        for uid in sorted(uids):
            if uid in uids_ok or uid.startswith("$"):
                f.ok(f"{path.name}: datasource uid {uid!r} is provisioned")
            else:
                f.fail(f"{path.name}: datasource uid {uid!r} is not in {PROVISIONED_UIDS_FILE.name} "
                       f"({sorted(uids_ok)})")
        queries += [(path.name, where, expr) for where, expr in exprs]

    try:
        edge_text, gen_text = scrape(args.edge, args.generator)
    except Exception as err:  # noqa: BLE001 - report and fail, whatever went wrong
        f.fail(f"could not start the binaries and scrape them: {err}")
        print(f"{f.passed} passed, {f.failed} failed")
        return 1
    samples, types = {}, {}
    for text in (edge_text, gen_text):
        s, t = parse_exposition(text)
        for name, labels in s.items():
            samples.setdefault(name, set()).update(labels)
        types.update(t)
    f.ok(f"scraped {len([n for n in samples if n.startswith('tokenfan_')])} tokenfan series "
         "names from tokenfan-edge and tokenfan-generator")

    src_dirs = args.source or sorted((ROOT / "crates").glob("*/src"))
    sources = source_literals(src_dirs)
    used: set[str] = set()
    checked: dict[str, str] = {}
    for dash_name, where, expr in queries:
        names = set(METRIC_RE.findall(expr))
        labels_in_expr: set[str] = set(SCRAPE_LABELS)
        for name in sorted(names):
            family = family_of(name, types) or name
            used.add(family)
            if name in samples:
                labels_in_expr |= samples[name]
                verdict = "exported"
            elif f'"{family}"' in sources or f'"{name}"' in sources:
                verdict = "in source only"
            else:
                verdict = "missing"
            if checked.get(name) == verdict:
                continue
            checked[name] = verdict
            if verdict == "exported":
                f.ok(f"{name} is exported")
            elif verdict == "in source only":
                f.passed += 1
                print(f"note  {name}: not exported after one stream, but registered in the "
                      "sources (appears on its first event)")
            else:
                f.fail(f"{dash_name} {where}: {name} is neither exported nor in the sources")
        # Label names in matchers must exist on that metric (when it is exported).
        for name, matchers in SELECTOR_RE.findall(expr):
            if name not in samples:
                continue
            for key in MATCHER_KEY_RE.findall(matchers):
                if key not in samples[name] | SCRAPE_LABELS:
                    f.fail(f"{dash_name} {where}: {name} has no label {key!r} "
                           f"(it has {sorted(samples[name])})")
        # Grouping labels must exist on one of the metrics of the expression.
        if all(n in samples for n in names):
            for group in GROUPING_RE.findall(expr):
                for key in [k.strip() for k in group.split(",") if k.strip()]:
                    if key not in labels_in_expr:
                        f.fail(f"{dash_name} {where}: groups by {key!r}, which none of "
                               f"{sorted(names)} has")

    unused = sorted(
        n for n in {family_of(n, types) or n for n in samples}
        if n.startswith("tokenfan_") and n not in used
    )
    if unused:
        print(f"note  exported but not on any dashboard: {', '.join(unused)}")
    print(f"{f.passed} passed, {f.failed} failed")
    return 1 if f.failed else 0


if __name__ == "__main__":
    sys.exit(main())
