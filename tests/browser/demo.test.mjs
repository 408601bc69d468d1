// Headless-Chromium tests of the demo page served by tokenfan-edge.
//
//   node --test tests/browser/          (from the repository root; tests/browser/run.sh does this)
//
// Environment:
//   TOKENFAN_EDGE_BIN  edge binary, relative to the repository root (default target/debug/tokenfan-edge)
//   CHROMIUM_PATH      browser executable (default /usr/bin/chromium)
//
// The edge is started with `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --log-format json`
// (a free admin port, so runs in parallel do not collide); the port comes from its JSON
// log line {"fields":{"message":"tokenfan-edge listening","addr":"127.0.0.1:PORT"}} on stderr.
// Nothing here sleeps for synchronisation: every wait is on a DOM state or a network event, with
// a timeout.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const repoRoot = path.resolve(here, '..', '..');
const PANELS = ['chat', 'eventsource', 'ws', 'longpoll', 'shortpoll'];
const TERMINAL = ['done', 'cancelled', 'error'];
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

let edge; // { child, addr, base, logs }
let browser;

// ------------------------------------------------------------------ edge process

function startEdge() {
  const bin = path.resolve(repoRoot, process.env.TOKENFAN_EDGE_BIN || 'target/debug/tokenfan-edge');
  if (!existsSync(bin)) {
    throw new Error(`edge binary not found: ${bin} (build it with \`cargo build -p tokenfan-edge\` or set TOKENFAN_EDGE_BIN)`);
  }
  const child = spawn(bin, ['--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--log-format', 'json'], {
    cwd: repoRoot,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs = [];
  return new Promise((resolve, reject) => {
    let settled = false;
    const timer = setTimeout(() => finish(new Error('edge did not log "tokenfan-edge listening" within 30 s')), 30_000);
    function finish(err, addr) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err) {
        child.kill('SIGKILL');
        err.message += `\n--- edge output (last lines) ---\n${logs.slice(-30).join('\n')}`;
        reject(err);
      } else {
        resolve({ child, addr, base: `http://${addr}`, logs });
      }
    }
    const onLine = (stream) => (line) => {
      logs.push(line);
      if (logs.length > 2000) logs.splice(0, 1000);
      let rec;
      try {
        rec = JSON.parse(line);
      } catch {
        return;
      }
      const fields = rec && typeof rec === 'object' ? rec.fields || {} : {};
      if (fields.message === 'tokenfan-edge listening' && typeof fields.addr === 'string') {
        if (stream !== 'stderr') logs.push(`(note: the listening line came on ${stream}, expected stderr)`);
        finish(null, fields.addr);
      }
    };
    readline.createInterface({ input: child.stderr }).on('line', onLine('stderr'));
    readline.createInterface({ input: child.stdout }).on('line', onLine('stdout'));
    child.on('error', (err) => finish(err));
    child.on('exit', (code, signal) => finish(new Error(`edge exited early (code ${code}, signal ${signal})`)));
  });
}

function stopEdge(e) {
  if (!e || e.child.exitCode !== null || e.child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const kill = setTimeout(() => e.child.kill('SIGKILL'), 5_000);
    e.child.once('exit', () => {
      clearTimeout(kill);
      resolve();
    });
    e.child.kill('SIGTERM');
  });
}

// ------------------------------------------------------------------ HTTP helpers (Node fetch)

async function createStream(base, body) {
  const res = await fetch(`${base}/v1/streams`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 201, `POST /v1/streams → ${res.status} ${text}`);
  const json = JSON.parse(text);
  assert.equal(typeof json.id, 'string', `201 body without id: ${text}`);
  return json.id;
}

// The whole answer of a stream by short-poll from the start: concatenated token texts.
async function answerOf(base, id) {
  const res = await fetch(`${base}/v1/streams/${encodeURIComponent(id)}?after=0`);
  const text = await res.text();
  assert.equal(res.status, 200, `GET /v1/streams/${id}?after=0 → ${res.status} ${text}`);
  const body = JSON.parse(text);
  const tokens = body.events.filter((e) => e.type === 'token');
  return { status: body.status, text: tokens.map((e) => e.text).join(''), events: body.events };
}

// ------------------------------------------------------------------ a TCP proxy that can cut a connection

// Forwards every connection to the edge. For connections carrying `GET /v1/streams/{id}/events`
// it counts the SSE `id:` lines going back to the browser and, the first time `cutAfterIds`
// have passed, ends that connection mid-stream (once).
function startProxy(target, { cutAfterIds }) {
  const state = {
    cut: false,
    eventRequests: [], // raw request heads of GET /v1/streams/{id}/events, in order
  };
  const sockets = new Set();
  const eventsLine = /GET \/v1\/streams\/[^/\s]+\/events[^\r\n]*\r\n/g;
  const server = net.createServer((client) => {
    const upstream = net.connect(target.port, target.host);
    sockets.add(client);
    sockets.add(upstream);
    let request = '';
    let watching = false;
    let downstream = '';
    client.on('data', (chunk) => {
      request = (request + chunk.toString('latin1')).slice(-16_384);
      eventsLine.lastIndex = 0;
      const m = eventsLine.exec(request);
      const end = m ? request.indexOf('\r\n\r\n', m.index) : -1;
      if (m && end >= 0) {
        state.eventRequests.push(request.slice(m.index, end));
        request = request.slice(end + 4);
        watching = true;
        downstream = '';
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (client.destroyed || client.writableEnded) return;
      client.write(chunk);
      if (!watching || state.cut) return;
      downstream += chunk.toString('utf8');
      const ids = downstream.match(/(^|\n)id:/g) || [];
      if (ids.length >= cutAfterIds) {
        state.cut = true;
        // Everything written so far reaches the browser, then the connection ends mid-stream.
        client.end();
        upstream.destroy();
      }
    });
    const closeBoth = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', closeBoth);
    upstream.on('error', closeBoth);
    client.on('close', closeBoth);
    upstream.on('close', () => {
      if (!client.writableEnded) client.end();
      sockets.delete(upstream);
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      resolve({
        port: server.address().port,
        state,
        close: () => new Promise((done) => {
          for (const s of sockets) s.destroy();
          server.close(() => done());
        }),
      });
    });
  });
}

// ------------------------------------------------------------------ page helpers

async function openPage(base) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    // The browser's own favicon request (the edge serves none) is not the page's problem.
    if (/\/favicon\.ico$/.test(msg.location()?.url || '')) return;
    problems.push(`console: ${msg.text()} (${msg.location()?.url || 'no location'})`);
  });
  page.on('response', (res) => {
    if (res.status() >= 400) problems.push(`http ${res.status()}: ${res.request().method()} ${res.url()}`);
  });
  await page.goto(`${base}/`);
  await page.waitForFunction(() => document.documentElement.dataset.ready === '1', null, { timeout: 10_000 });
  return { page, context, problems };
}

function panelSnapshot(page, names) {
  return page.evaluate((list) => Object.fromEntries(list.map((name) => {
    const root = document.querySelector(`[data-panel="${name}"]`);
    const out = root.querySelector('[data-role="output"]');
    const status = root.querySelector(':scope > [data-role="status"]');
    const cardStatus = out?.closest('.ws-stream')?.querySelector('.status');
    return [name, {
      state: root.dataset.state,
      text: out ? out.textContent : null,
      streamId: root.dataset.streamId || null,
      duplicates: root.dataset.duplicates ?? null,
      reconnects: root.dataset.reconnects ?? null,
      resumedFrom: root.dataset.resumedFrom ?? null,
      status: [status?.textContent, cardStatus?.textContent].filter(Boolean).join(' | '),
    }];
  })), names);
}

// Uncaught exceptions and Content-Security-Policy violations always fail; with strict, so do
// console errors and failed (≥ 400) requests.
function assertClean(problems, { strict }) {
  const bad = problems.filter((p) => p.startsWith('pageerror')
    || /Content Security Policy/i.test(p)
    || (strict && (p.startsWith('console') || p.startsWith('http '))));
  assert.ok(bad.length === 0, `page problems:\n${bad.join('\n')}`);
}

// Wait until every named panel is in a terminal state; on timeout, fail with what each shows.
async function waitForPanels(page, names, timeout, problems) {
  try {
    await page.waitForFunction(({ list, terminal }) => list.every((name) => {
      const root = document.querySelector(`[data-panel="${name}"]`);
      return root && terminal.includes(root.dataset.state);
    }), { list: names, terminal: TERMINAL }, { timeout, polling: 50 });
  } catch (err) {
    const snap = await panelSnapshot(page, names).catch(() => ({}));
    const summary = Object.entries(snap)
      .map(([n, s]) => `  ${n}: state=${s.state} status=${JSON.stringify(s.status)} text=${JSON.stringify((s.text || '').slice(0, 60))}`)
      .join('\n');
    throw new Error(`panels did not finish within ${timeout} ms:\n${summary}\n${problems.join('\n')}\n${err.message}`);
  }
  return panelSnapshot(page, names);
}

// ------------------------------------------------------------------ lifecycle

before(async () => {
  edge = await startEdge();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    args: CHROMIUM_ARGS,
  });
});

after(async () => {
  await browser?.close().catch(() => undefined);
  await stopEdge(edge);
});

// ------------------------------------------------------------------ tests

test('every transport panel shows the same answer for the same seed', { timeout: 45_000 }, async () => {
  const { page, context, problems } = await openPage(edge.base);
  try {
    await page.fill('#prompt', 'Explain streaming tokens to a browser, with a short code sample.');
    await page.fill('#max-tokens', '40');
    await page.fill('#seed', '4242');
    await page.fill('#ttft-ms', '20');
    await page.fill('#inter-token-ms', '5');
    await page.click('#run-all');

    const snap = await waitForPanels(page, PANELS, 30_000, problems);
    for (const name of PANELS) {
      assert.equal(snap[name].state, 'done', `${name} ended ${snap[name].state}: ${snap[name].status}`);
      assert.equal(snap[name].duplicates, '0', `${name} dropped duplicate events`);
    }
    const expected = snap.chat.text;
    assert.ok(expected.length > 0, 'chat answer is empty');
    for (const name of PANELS) {
      assert.equal(snap[name].text, expected, `${name} text differs from chat text`);
    }

    // The chat stream's history, read independently, is the same answer.
    assert.ok(snap.chat.streamId, 'chat panel shows no stream id (x-stream-id header missing?)');
    const truth = await answerOf(edge.base, snap.chat.streamId);
    assert.equal(truth.text, expected, 'chat text differs from the stream history');

    // Five separate streams were created (one per panel), all with the same answer.
    const ids = new Set(PANELS.map((n) => snap[n].streamId));
    assert.equal(ids.size, PANELS.length, `expected one stream per panel, got ${[...ids].join(', ')}`);

    // The page works under the edge's Content-Security-Policy and nothing it asked for failed.
    assertClean(problems, { strict: true });
  } finally {
    await context.close();
  }
});

test('EventSource resumes with Last-Event-ID after its connection is cut', { timeout: 45_000 }, async () => {
  const [host, port] = [edge.addr.slice(0, edge.addr.lastIndexOf(':')), Number(edge.addr.slice(edge.addr.lastIndexOf(':') + 1))];
  const body = {
    prompt: 'Tell me about resumable streams.',
    max_tokens: 60,
    seed: 99,
    timing: { ttft_ms: 20, inter_token_ms: 30 },
  };
  let proxy;
  let opened;
  try {
    // The page goes through the proxy. The stream is created only once the page is ready and
    // is attached at once, so the EventSource connects while the stream is still early.
    proxy = await startProxy({ host, port }, { cutAfterIds: 5 });
    opened = await openPage(`http://127.0.0.1:${proxy.port}`);
    const { page, problems } = opened;
    const id = await createStream(edge.base, body);
    await page.evaluate((streamId) => {
      const root = document.querySelector('[data-panel="eventsource"]');
      root.querySelector('[data-role="stream-input"]').value = streamId;
      root.querySelector('[data-action="attach"]').click();
    }, id);

    const snap = (await waitForPanels(page, ['eventsource'], 30_000, problems)).eventsource;
    if (process.env.TOKENFAN_TEST_VERBOSE) {
      console.log(JSON.stringify({ snap: { ...snap, text: snap.text.slice(0, 80) }, requests: proxy.state.eventRequests }, null, 2));
    }
    assert.ok(proxy.state.cut, `the proxy never saw 5 SSE ids on the events connection (${proxy.state.eventRequests.length} requests)`);
    assert.equal(snap.state, 'done', `EventSource panel ended ${snap.state}: ${snap.status}`);
    assert.ok(Number(snap.reconnects) >= 1, `expected a reconnect, data-reconnects=${snap.reconnects}`);
    assert.equal(snap.duplicates, '0', 'EventSource panel received duplicate events');

    // The reconnect went through the proxy carrying Last-Event-ID = the last id the page had.
    assert.ok(proxy.state.eventRequests.length >= 2, `expected ≥ 2 event requests, saw ${proxy.state.eventRequests.length}`);
    const resumed = proxy.state.eventRequests[1].match(/\r\nlast-event-id:\s*([^\r\n]*)/i);
    assert.ok(resumed, `the reconnect carried no Last-Event-ID:\n${proxy.state.eventRequests[1]}`);
    assert.equal(resumed[1].trim(), snap.resumedFrom, 'Last-Event-ID sent differs from the id the panel shows');

    const truth = await answerOf(edge.base, id);
    assert.equal(truth.status, 'done', `stream status ${truth.status}`);
    assert.ok(truth.text.length > 0, 'stream answer is empty');
    assert.equal(snap.text, truth.text, 'EventSource text differs from the stream history');
    // The cut connection is logged as a network error by Chromium; anything else is not expected.
    assertClean(problems, { strict: false });
  } finally {
    await opened?.context.close();
    await proxy?.close();
  }
});
