"""pytest fixtures for the third-party client tests.

The edge under test is the one at TOKENFAN_EDGE_URL (run.sh starts it and sets this). When the
variable is absent, the session starts its own: TOKENFAN_EDGE_BIN (default
target/debug/tokenfan-edge, relative to the repository root) with
`--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json`, and reads the port from the JSON log line
{"fields":{"message":"tokenfan-edge listening","addr":"127.0.0.1:PORT"}} on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_edge(*extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Starts an edge with `extra` flags (and `env` added to the environment); returns the
    process and its base URL."""
    bin_path = REPO_ROOT / os.environ.get("TOKENFAN_EDGE_BIN", "target/debug/tokenfan-edge")
    if not bin_path.exists():
        raise RuntimeError(f"edge binary not found: {bin_path} (cargo build -p tokenfan-edge)")
    child = subprocess.Popen(
        [str(bin_path), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json", *extra],
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    found: dict[str, str] = {}
    ready = threading.Event()

    def read_logs() -> None:
        # Keeps draining stderr for the edge's whole life so it never blocks on a full pipe.
        for line in child.stderr:  # type: ignore[union-attr]
            if not ready.is_set():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("message") == "tokenfan-edge listening":
                    found["addr"] = fields["addr"]
                    ready.set()
        ready.set()

    threading.Thread(target=read_logs, daemon=True).start()
    if not ready.wait(30) or "addr" not in found:
        child.kill()
        raise RuntimeError("edge did not log 'tokenfan-edge listening' within 30 s")
    return child, f"http://{found['addr']}"


@pytest.fixture(scope="session")
def edge_url() -> str:
    url = os.environ.get("TOKENFAN_EDGE_URL")
    if url:
        yield url.rstrip("/")
        return
    child, url = start_edge()
    try:
        yield url
    finally:
        child.kill()
        child.wait(10)
