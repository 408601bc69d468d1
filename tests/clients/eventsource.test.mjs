// The npm `eventsource` package (a WHATWG EventSource for Node, with reconnect and
// Last-Event-ID) against tokenfan-edge's `GET /v1/streams/{id}/events`.
//
//   tests/clients/run.sh                       (installs, starts the edge, runs everything)
//   node --test tests/clients/eventsource.test.mjs   (after `npm ci` in tests/clients; starts its
//                                                      own edge unless TOKENFAN_EDGE_URL is set)
//
// Environment: TOKENFAN_EDGE_URL (an edge already running), else TOKENFAN_EDGE_BIN (default
// target/debug/tokenfan-edge, relative to the repository root) is started on 127.0.0.1:0.
//
// Nothing here sleeps to synchronise: every wait is on an event or a long-poll, with a timeout.
// The one timed wait (NO_RECONNECT_WINDOW_MS) checks that something does NOT happen: that the
// library does not reconnect after a 204.
//
// Note for readers: EventSource dispatches the stream's own `event: error` frames (a MessageEvent
// with `data`) and its connection errors (an ErrorEvent without `data`) under the same name
// "error"; the listeners below tell them apart by `data`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { EventSource } from 'eventsource';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
const WAIT_MS = 20_000;
/** The edge's `retry:` hint is 1000 ms; a reconnect would have happened well within this. */
const NO_RECONNECT_WINDOW_MS = 1_500;
const FAST = { ttft_ms: 5, inter_token_ms: 2 };

let edge; // { child | null, base }

// ------------------------------------------------------------------ edge process

function startEdge() {
  const bin = path.resolve(repoRoot, process.env.TOKENFAN_EDGE_BIN || 'target/debug/tokenfan-edge');
  if (!existsSync(bin)) throw new Error(`edge binary not found: ${bin} (cargo build -p tokenfan-edge)`);
  const child = spawn(bin, ['--listen', '127.0.0.1:0', '--log-format', 'json'], {
    cwd: repoRoot,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error('edge did not log "tokenfan-edge listening" within 30 s'));
    }, 30_000);
    child.on('exit', (code) => reject(new Error(`edge exited early (${code})`)));
    readline.createInterface({ input: child.stderr }).on('line', (line) => {
      let fields;
      try { fields = JSON.parse(line).fields; } catch { return; }
      if (fields?.message === 'tokenfan-edge listening') {
        clearTimeout(timer);
        resolve({ child, base: `http://${fields.addr}` });
      }
    });
  });
}

before(async () => {
  const url = process.env.TOKENFAN_EDGE_URL;
  edge = url ? { child: null, base: url.replace(/\/$/, '') } : await startEdge();
});

after(() => {
  edge?.child?.kill('SIGKILL');
});

// ------------------------------------------------------------------ helpers

async function createStream(body) {
  const res = await fetch(`${edge.base}/v1/streams`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 201, `POST /v1/streams: ${res.status} ${await res.clone().text()}`);
  const json = await res.json();
  assert.ok(json.id && json.urls?.events, `201 body lacks id/urls: ${JSON.stringify(json)}`);
  return json;
}

async function shortPoll(id, after = 0) {
  const res = await fetch(`${edge.base}/v1/streams/${id}?after=${after}`);
  assert.equal(res.status, 200);
  return res.json();
}

/** Waits (long-poll) until the stream has its terminal event; returns every event. */
async function waitTerminal(id) {
  const deadline = Date.now() + WAIT_MS;
  let after = 0;
  const events = [];
  while (Date.now() < deadline) {
    const res = await fetch(`${edge.base}/v1/streams/${id}/poll?after=${after}&timeout_ms=5000`);
    assert.equal(res.status, 200);
    const body = await res.json();
    events.push(...body.events);
    after = body.next_after;
    if (events.some((e) => e.type !== 'token')) return events;
  }
  throw new Error(`stream ${id} did not end within ${WAIT_MS} ms`);
}

const textOf = (events) => events.filter((e) => e.type === 'token').map((e) => e.text).join('');

function assertContiguous(events) {
  const seqs = events.map((e) => e.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `seqs not 1..n without gap or duplicate: ${seqs}`);
  assert.equal(events.at(-1).type, 'done');
  assert.equal(events.filter((e) => e.type !== 'token').length, 1, 'exactly one terminal event');
}

/** A fetch for EventSource that records each request's Last-Event-ID and response status. */
function recordingFetch() {
  const calls = [];
  const wrapped = async (url, init) => {
    const call = { url: String(url), lastEventId: init?.headers?.['Last-Event-ID'] ?? null, status: null };
    calls.push(call);
    const res = await fetch(url, init);
    call.status = res.status;
    return res;
  };
  return { calls, fetch: wrapped };
}

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Attaches listeners to `es`: collects native token/done events (checking that lastEventId equals
 * the seq), counts opens and connection errors (with the readyState at that moment).
 * `terminal` resolves at the stream's done/error event; `closed` at a connection error that left
 * the EventSource CLOSED.
 */
function observe(es, { closeOnTerminal = true } = {}) {
  const events = [];
  const errors = [];
  const opens = [];
  let resolveTerminal, resolveClosed;
  const terminal = new Promise((r) => { resolveTerminal = r; });
  const closed = new Promise((r) => { resolveClosed = r; });
  const onFrame = (msg) => {
    const event = JSON.parse(msg.data);
    assert.equal(msg.type, event.type);
    assert.equal(msg.lastEventId, String(event.seq), 'lastEventId must be the seq');
    events.push(event);
    if (event.type !== 'token') {
      if (closeOnTerminal) es.close();
      resolveTerminal(event);
    }
  };
  es.addEventListener('token', onFrame);
  es.addEventListener('done', onFrame);
  es.addEventListener('open', () => opens.push(Date.now()));
  es.addEventListener('error', (e) => {
    if (typeof e.data === 'string') return onFrame(e); // a stream `event: error` frame
    errors.push({ readyState: es.readyState, code: e.code, message: e.message });
    if (es.readyState === es.CLOSED) resolveClosed();
  });
  return { events, errors, opens, terminal, closed };
}

/**
 * A TCP proxy in front of the edge. On its first connection it lets the response through up to
 * the middle of the SSE frame `id: <cutBeforeSeq>` and then destroys both sockets; later
 * connections pass untouched. Records each request's head (to see Last-Event-ID on the wire).
 */
async function startCuttingProxy(target, cutBeforeSeq) {
  const { hostname, port } = new URL(target);
  const conns = [];
  const sockets = new Set();
  const server = net.createServer((client) => {
    const info = { head: '', cut: false };
    const first = conns.length === 0;
    conns.push(info);
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client).add(upstream);
    const closeBoth = () => { client.destroy(); upstream.destroy(); };
    client.on('error', closeBoth).on('close', closeBoth);
    upstream.on('error', closeBoth).on('close', closeBoth);
    client.on('data', (d) => {
      if (!info.head.includes('\r\n\r\n')) info.head += d.toString('latin1');
      upstream.write(d);
    });
    let seen = '';
    const marker = `\nid: ${cutBeforeSeq}\n`;
    upstream.on('data', (d) => {
      if (info.cut) return;
      if (first) {
        const start = seen.length;
        seen += d.toString('latin1');
        const at = seen.indexOf(marker);
        if (at >= 0) {
          // Forward through the frame's `id:` line and part of the next line, then cut.
          const cutAt = at + marker.length + 4;
          client.write(d.subarray(0, Math.max(0, cutAt - start)));
          info.cut = true;
          // Let the written bytes reach the client before the reset.
          client.end(() => closeBoth());
          return;
        }
      }
      client.write(d);
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    conns,
    close: () => new Promise((r) => { for (const s of sockets) s.destroy(); server.close(r); }),
  };
}

const lastEventIdOf = (head) => /\r\nlast-event-id:\s*([^\r\n]*)/i.exec(head)?.[1] ?? null;

// ------------------------------------------------------------------ tests

test('EventSource reads a stream created by POST /v1/streams; text equals the short-poll text', async () => {
  const created = await createStream({ prompt: 'Tell me about EventSource.', max_tokens: 30, seed: 21, timing: FAST });
  const rec = recordingFetch();
  const es = new EventSource(`${edge.base}${created.urls.events}`, { fetch: rec.fetch });
  const seen = observe(es);
  const terminal = await withTimeout(seen.terminal, 'done event');
  assert.equal(terminal.type, 'done');
  assert.ok(['stop', 'length'].includes(terminal.finish_reason));
  assert.equal(es.readyState, es.CLOSED);
  assert.deepEqual(seen.errors, []);
  assert.equal(seen.opens.length, 1);
  assert.equal(rec.calls.length, 1);
  assert.equal(rec.calls[0].status, 200);
  assert.equal(rec.calls[0].lastEventId, null);

  assertContiguous(seen.events);
  const polled = await shortPoll(created.id);
  assert.equal(polled.status, 'done');
  assert.deepEqual(seen.events, polled.events);
  assert.ok(textOf(seen.events).length > 0);
  assert.equal(textOf(seen.events), textOf(polled.events));
  assert.equal(terminal.usage.completion_tokens, seen.events.length - 1);
});

test('a dropped connection: EventSource reconnects with Last-Event-ID; no gap, no duplicate', async () => {
  const CUT = 6; // the first connection dies in the middle of the frame of seq 6
  // Slow enough that the stream is still running when the library reconnects (retry: 1000).
  const created = await createStream({
    prompt: 'Tell me about reconnects.', max_tokens: 40, seed: 22,
    timing: { ttft_ms: 5, inter_token_ms: 40 },
  });
  const proxy = await startCuttingProxy(edge.base, CUT);
  try {
    const rec = recordingFetch();
    const es = new EventSource(`${proxy.base}${created.urls.events}`, { fetch: rec.fetch });
    const seen = observe(es);
    const terminal = await withTimeout(seen.terminal, 'done event after reconnect');
    assert.equal(terminal.type, 'done');

    // A reconnect happened, announced by one connection error while CONNECTING.
    assert.equal(proxy.conns.length, 2, `connections through the proxy: ${proxy.conns.length}`);
    assert.ok(proxy.conns[0].cut, 'the first connection was not cut');
    assert.equal(seen.opens.length, 2);
    assert.equal(seen.errors.length, 1);
    assert.equal(seen.errors[0].readyState, es.CONNECTING);
    assert.equal(rec.calls.length, 2);

    // The resume point on the wire is the last event the client got before the cut.
    assert.equal(lastEventIdOf(proxy.conns[0].head), null);
    const resumedFrom = lastEventIdOf(proxy.conns[1].head);
    assert.equal(resumedFrom, String(CUT - 1), `Last-Event-ID on reconnect: ${resumedFrom}`);
    assert.equal(rec.calls[1].lastEventId, String(CUT - 1));

    assertContiguous(seen.events);
    const all = await waitTerminal(created.id);
    assert.deepEqual(seen.events, all);
    const polled = await shortPoll(created.id);
    assert.equal(textOf(seen.events), textOf(polled.events));
  } finally {
    await proxy.close();
  }
});

test('after the terminal event the reconnect gets 204: error event, CLOSED, no more reconnects', async () => {
  const created = await createStream({ prompt: 'Tell me about 204.', max_tokens: 10, seed: 23, timing: FAST });
  const rec = recordingFetch();
  const es = new EventSource(`${edge.base}${created.urls.events}`, { fetch: rec.fetch });
  // Not closed at `done`: the edge ends the response, and the library reconnects as a browser would.
  const seen = observe(es, { closeOnTerminal: false });
  const terminal = await withTimeout(seen.terminal, 'done event');
  await withTimeout(seen.closed, 'EventSource CLOSED after 204');

  assert.equal(rec.calls.length, 2);
  assert.deepEqual(rec.calls.map((c) => c.status), [200, 204]);
  assert.equal(rec.calls[1].lastEventId, String(terminal.seq));
  // One error for the end of the first response (reconnecting), one for the 204 (closed).
  assert.deepEqual(seen.errors.map((e) => e.readyState), [es.CONNECTING, es.CLOSED]);
  assert.equal(seen.errors[1].code, 204);
  assertContiguous(seen.events);

  await new Promise((r) => setTimeout(r, NO_RECONNECT_WINDOW_MS));
  assert.equal(rec.calls.length, 2, 'EventSource reconnected after a 204');
  assert.equal(es.readyState, es.CLOSED);
});

test('EventSource positioned at the end of a finished stream (?after=terminal) gets 204 and stops', async () => {
  const created = await createStream({ prompt: 'Tell me about the end.', max_tokens: 8, seed: 24, timing: FAST });
  const events = await waitTerminal(created.id);
  const last = events.at(-1).seq;
  const rec = recordingFetch();
  const es = new EventSource(`${edge.base}${created.urls.events}?after=${last}`, { fetch: rec.fetch });
  const seen = observe(es);
  await withTimeout(seen.closed, 'EventSource CLOSED after 204');
  assert.deepEqual(seen.events, []);
  assert.equal(seen.opens.length, 0);
  assert.equal(seen.errors.length, 1);
  assert.equal(seen.errors[0].code, 204);

  await new Promise((r) => setTimeout(r, NO_RECONNECT_WINDOW_MS));
  assert.deepEqual(rec.calls.map((c) => c.status), [204]);
  assert.equal(es.readyState, es.CLOSED);
});

test('EventSource with ?after= beyond the terminal seq fails once (400) and stops', async () => {
  const created = await createStream({ prompt: 'Tell me about cursors.', max_tokens: 4, seed: 25, timing: FAST });
  const events = await waitTerminal(created.id);
  const rec = recordingFetch();
  const es = new EventSource(`${edge.base}${created.urls.events}?after=${events.at(-1).seq + 5}`, { fetch: rec.fetch });
  const seen = observe(es);
  await withTimeout(seen.closed, 'EventSource CLOSED after 400');
  assert.deepEqual(seen.errors.map((e) => [e.readyState, e.code]), [[es.CLOSED, 400]]);
  assert.deepEqual(rec.calls.map((c) => c.status), [400]);
});
