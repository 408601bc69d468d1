#!/usr/bin/env python3
"""The client side of scripts/compose-smoke.sh: streams through the compose topology's nginx.

Standard library only. Every stream read is verified against the stored history: seqs strictly
increasing with nothing lost and nothing twice (a coalesced event carries the seq of its last
token), exactly one terminal event, last, and the text equal to the history's.

The smoke's nginx copy honours `X-Smoke-Edge: edge-N` (pins a request to one edge); without it a
request goes through the real balancer, as a user's would.

  compose_smoke_client.py --url http://127.0.0.1:PORT --redis-container NAME SCENARIO
  SCENARIO: openai | resume | stop | kill --kill-cmd CMD --container-of PROJECT
            | drain --stop-cmd CMD --container-of PROJECT
"""

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.parse

TERMINAL = ("done", "error")


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


class Api:
    def __init__(self, url, redis_container):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port
        self.redis = redis_container

    def conn(self, timeout=30):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, edge=None, timeout=30):
        """One request on its own connection; returns (response, connection)."""
        h = {"content-type": "application/json"} if body is not None else {}
        h.update(headers or {})
        if edge:
            h["x-smoke-edge"] = edge
        c = self.conn(timeout)
        c.request(method, path, body=None if body is None else json.dumps(body), headers=h)
        return c.getresponse(), c

    def json(self, method, path, body=None, edge=None, want=(200,)):
        # A GET that meets an edge going away is simply asked again, as a client would.
        for attempt in range(3 if method == "GET" else 1):
            try:
                r, c = self.request(method, path, body, edge=edge)
                data = r.read()
                c.close()
                break
            except (OSError, http.client.HTTPException) as e:
                if attempt == 2 or method != "GET":
                    raise Fail(f"{method} {path} via {edge or 'balancer'}: {e!r}") from e
        check(r.status in want, f"{method} {path} via {edge or 'balancer'}: {r.status} {data[:300]!r}")
        return json.loads(data) if data else None

    def create(self, edge=None, max_tokens=60, inter_token_ms=40, seed=7):
        body = {
            "prompt": "Tell me about containers.",
            "max_tokens": max_tokens,
            "seed": seed,
            "timing": {"ttft_ms": 50, "inter_token_ms": inter_token_ms},
        }
        return self.json("POST", "/v1/streams", body, edge=edge, want=(201,))["id"]

    def history(self, sid):
        """All events of a stream (short-poll from 0) once it has ended."""
        deadline = time.monotonic() + 60
        while True:
            st = self.json("GET", f"/v1/streams/{sid}?after=0")
            if st["status"] != "running":
                return st
            check(time.monotonic() < deadline, f"{sid} still running after 60 s")
            time.sleep(0.2)

    def owner(self, sid):
        out = subprocess.run(
            ["podman", "exec", self.redis, "redis-cli", "GET", f"tokenfan:{{{sid}}}:lease"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return out or None

    def wait_owner(self, sid, timeout=10):
        """The lease holder, once there is one (the owner takes it as its task starts)."""
        deadline = time.monotonic() + timeout
        while (owner := self.owner(sid)) is None:
            check(time.monotonic() < deadline, f"{sid}: nobody holds the lease after {timeout} s")
            time.sleep(0.1)
        return owner

    def sse(self, sid, after=0, edge=None, fmt=None):
        """Yields the events of one GET /events response; returns when the body ends."""
        headers = {"accept": "text/event-stream"}
        if after:
            headers["last-event-id"] = str(after)
        path = f"/v1/streams/{sid}/events" + (f"?format={fmt}" if fmt else "")
        r, c = self.request("GET", path, headers=headers, edge=edge, timeout=60)
        try:
            if r.status == 204:
                return
            if r.status != 200:
                raise Fail(f"GET {path} (after {after}): {r.status} {r.read()[:300]!r}")
            yield from parse_sse(r)
        finally:
            c.close()


def parse_sse(resp):
    """Yields (id, event, data-as-JSON-or-str) per SSE event of a response body."""
    ev_id, ev_type, data = None, None, []
    while True:
        try:
            line = resp.readline()
        except (OSError, http.client.HTTPException):
            return
        if not line:
            return
        line = line.decode("utf-8").rstrip("\r\n")
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = text
                yield ev_id, ev_type, payload
            ev_id, ev_type, data = None, None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                ev_id = value
            elif field == "event":
                ev_type = value
            elif field == "data":
                data.append(value)


class Reader:
    """Reads a stream to its end like EventSource: reconnects with Last-Event-ID (through the
    balancer) whenever a response ends before the terminal event."""

    def __init__(self, api, sid, first_edge=None, stop_after=None):
        self.api, self.sid, self.first_edge = api, sid, first_edge
        self.events = []
        self.reconnects = 0
        self.error = None
        self.got = threading.Event()  # set once `stop_after` events arrived
        self.stop_after = stop_after

    def last_seq(self):
        return self.events[-1]["seq"] if self.events else 0

    def run(self):
        try:
            edge = self.first_edge
            deadline = time.monotonic() + 120
            while not (self.events and self.events[-1]["type"] in TERMINAL):
                check(time.monotonic() < deadline, f"{self.sid}: no terminal event after 120 s")
                try:
                    for _id, _type, ev in self.api.sse(self.sid, self.last_seq(), edge):
                        check(isinstance(ev, dict), f"{self.sid}: non-JSON event {ev!r}")
                        check(str(ev["seq"]) == _id, f"{self.sid}: id {_id} != seq {ev['seq']}")
                        self.events.append(ev)
                        if self.stop_after and len(self.events) >= self.stop_after:
                            self.got.set()
                except (OSError, http.client.HTTPException):
                    pass  # the edge went away mid-response: reconnect
                if not (self.events and self.events[-1]["type"] in TERMINAL):
                    self.reconnects += 1
                    edge = None
                    time.sleep(0.2)  # EventSource's retry: 1000 ms, shortened
        except Exception as e:  # noqa: BLE001 - reported by the caller
            self.error = e
        finally:
            self.got.set()


def verify(api, sid, events, label, finish=("stop", "length")):
    """events: what a client received from seq 0 on. Checks them against the history."""
    check(events, f"{label}: no events")
    seqs = [e["seq"] for e in events]
    check(all(b > a for a, b in zip(seqs, seqs[1:])), f"{label}: seqs not strictly increasing: {seqs}")
    terminals = [e for e in events if e["type"] in TERMINAL]
    check(len(terminals) == 1 and events[-1] is terminals[0], f"{label}: terminal events {terminals}")
    hist = api.history(sid)
    h_events = hist["events"]
    h_text = "".join(e["text"] for e in h_events if e["type"] == "token")
    text = "".join(e["text"] for e in events if e["type"] == "token")
    check(text == h_text, f"{label}: text differs from the history ({len(text)} vs {len(h_text)} chars)")
    check(events[-1] == h_events[-1], f"{label}: terminal {events[-1]} != history {h_events[-1]}")
    term = events[-1]
    check(term["type"] == "done" and term.get("finish_reason") in finish,
          f"{label}: ended with {term}")
    h_tokens = [e for e in h_events if e["type"] == "token"]
    check(term["seq"] == h_tokens[-1]["seq"] + 1 if h_tokens else True,
          f"{label}: terminal seq {term['seq']} is not one past the last token")
    return term


# ------------------------------------------------------------------ scenarios

def openai(api, _args):
    body = {
        "model": "tokenfan-mock",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 30,
    }
    r, c = api.request("POST", "/v1/chat/completions", body, headers={"accept": "text/event-stream"})
    if r.status != 200:
        raise Fail(f"chat completions: {r.status} {r.read()[:300]!r}")
    check(r.getheader("content-type", "").startswith("text/event-stream"), "not an event stream")
    sid = r.getheader("x-stream-id")
    check(sid, "no x-stream-id header")
    chunks, done, text = [], False, ""
    for _id, _type, data in parse_sse(r):
        if data == "[DONE]":
            done = True
            break
        check(isinstance(data, dict) and data.get("object") == "chat.completion.chunk", f"chunk {data!r}")
        check(data["id"] == f"chatcmpl-{sid}", f"chunk id {data['id']}")
        chunks.append(data)
        for ch in data.get("choices", []):
            text += ch.get("delta", {}).get("content") or ""
    c.close()
    check(done, "no data: [DONE]")
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    check(usage and usage[-1]["completion_tokens"] > 0, f"no usage chunk: {chunks[-2:]}")
    hist = api.history(sid)
    h_text = "".join(e["text"] for e in hist["events"] if e["type"] == "token")
    check(text == h_text, "OpenAI text differs from the stored history")
    print(f"ok    OpenAI stream through nginx: {len(chunks)} chunks, {usage[-1]['completion_tokens']} tokens, [DONE]")


def resume(api, _args):
    sid = api.create(edge="edge-1", max_tokens=40, inter_token_ms=30)
    owner = api.wait_owner(sid)
    check(owner == "edge-1", f"stream created on edge-1 is owned by {owner}")
    first = []
    for _id, _t, ev in api.sse(sid, 0, edge="edge-1"):
        first.append(ev)
        if len(first) >= 5:
            break  # the client goes away after 5 events
    check(len(first) == 5 and first[-1]["type"] == "token", f"first read: {first}")
    rest = []
    for _id, _t, ev in api.sse(sid, first[-1]["seq"], edge="edge-2"):
        rest.append(ev)
    events = first + rest
    term = verify(api, sid, events, "resume on edge-2")
    print(f"ok    native stream owned by edge-1, 5 events read on edge-1, resumed on edge-2 with "
          f"Last-Event-ID {first[-1]['seq']}: {len(events)} events to seq {term['seq']}, none lost or repeated")


def stop(api, _args):
    sid = api.create(edge="edge-1", max_tokens=500, inter_token_ms=50)
    reader = Reader(api, sid, first_edge="edge-2", stop_after=3)
    t = threading.Thread(target=reader.run)
    t.start()
    reader.got.wait(30)
    check(reader.error is None, f"reader: {reader.error}")
    res = api.json("DELETE", f"/v1/streams/{sid}", edge="edge-3", want=(202,))
    check(res["status"] == "cancelled", f"DELETE on edge-3 answered {res}")
    t.join(60)
    check(not t.is_alive() and reader.error is None, f"reader on edge-2: {reader.error}")
    term = verify(api, sid, reader.events, "stop", finish=("cancelled",))
    print(f"ok    stream owned by edge-1, read on edge-2, stopped by DELETE on edge-3: "
          f"reader got finish_reason cancelled at seq {term['seq']}")


def container_of(project, service):
    out = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
         "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    check(out, f"no container for {service}")
    return out[0]


def kill(api, args):
    sid = api.create(edge="edge-3", max_tokens=300, inter_token_ms=40)
    owner = api.wait_owner(sid)
    check(owner == "edge-3", f"stream created on edge-3 is owned by {owner}")
    # The reader starts on the owner itself, so the kill cuts it too; it reconnects through
    # the balancer with Last-Event-ID, like EventSource.
    reader = Reader(api, sid, first_edge=owner, stop_after=10)
    t = threading.Thread(target=reader.run)
    t.start()
    reader.got.wait(30)
    check(reader.error is None and len(reader.events) >= 10, f"reader: {reader.error}")
    cmd = args.kill_cmd.format(container=container_of(args.container_of, owner))
    subprocess.run(cmd, shell=True, check=True, capture_output=True)
    at = reader.last_seq()
    check(reader.events[-1]["type"] not in TERMINAL, "the stream ended before the kill")
    t.join(120)
    check(not t.is_alive() and reader.error is None, f"reader: {reader.error}")
    term = verify(api, sid, reader.events, "kill")
    new_owner = api.owner(sid)
    check(reader.reconnects >= 1, "the reader was not cut by the kill")
    print(f"ok    `{cmd}` at seq ~{at}: the reader reconnected {reader.reconnects}x through nginx, "
          f"got every event to seq {term['seq']} once, in order (lease now {new_owner or 'released'})")


def drain(api, args):
    # Streams owned by edge-2, half read on edge-2 itself, half through the balancer.
    # 400 tokens at 50 ms: 20 s, far longer than it takes to start them all and stop the edge.
    sids = [api.create(edge="edge-2", max_tokens=400, inter_token_ms=50, seed=100 + i) for i in range(6)]
    for sid in sids:
        owner = api.wait_owner(sid)
        check(owner == "edge-2", f"{sid} owned by {owner}")
    readers = [Reader(api, sid, first_edge="edge-2" if i % 2 == 0 else None, stop_after=5)
               for i, sid in enumerate(sids)]
    threads = [threading.Thread(target=r.run) for r in readers]
    for t in threads:
        t.start()
    for r in readers:
        r.got.wait(30)
        check(r.error is None, f"reader: {r.error}")
    at_stop = [len(r.events) for r in readers]
    for r in readers:
        check(r.events[-1]["type"] not in TERMINAL, f"{r.sid} ended before the stop: nothing to drain")
    container = container_of(args.container_of, "edge-2")
    cmd = args.stop_cmd.format(container=container)
    started = time.monotonic()
    subprocess.run(cmd, shell=True, check=True, capture_output=True)
    took = time.monotonic() - started
    state = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", container],
                           capture_output=True, text=True, check=True).stdout.strip()
    check(state == "0", f"edge-2 exited with {state} after SIGTERM (not a clean drain)")
    for t in threads:
        t.join(120)
    for r, sid in zip(readers, sids):
        check(r.error is None, f"{sid}: {r.error}")
        verify(api, sid, r.events, f"drain {sid}")
        owner = api.owner(sid)
        check(owner != "edge-2", f"{sid} still leased by edge-2")
    for i, r in enumerate(readers):
        if i % 2 == 0:
            check(r.reconnects >= 1, f"{r.sid}: read on edge-2, but the drain did not end its response")
    cut = sum(1 for r in readers if r.reconnects)
    print(f"ok    `{cmd}`: edge-2 drained and exited 0 in {took:.1f}s; its 6 streams finished "
          f"elsewhere, complete ({cut} readers reconnected through nginx; events before the "
          f"stop: {[n for n in at_stop]}, reconnects: {[r.reconnects for r in readers]})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--redis-container", required=True)
    p.add_argument("scenario", choices=["openai", "resume", "stop", "kill", "drain"])
    p.add_argument("--kill-cmd")
    p.add_argument("--stop-cmd")
    p.add_argument("--container-of")
    args = p.parse_args()
    api = Api(args.url, args.redis_container)
    try:
        globals()[args.scenario](api, args)
    except Fail as e:
        print(f"FAIL  {args.scenario}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
