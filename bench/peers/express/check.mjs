// End-to-end check of a server that speaks tokenfan's native wire format (a benchmark peer, or
// tokenfan itself): every transport asked for reads one stream start to end and verifies seqs
// 1..n exactly once and in order, exactly one terminal `done` whose usage counts the tokens, the
// same text on every transport, and `emitted_at_unix_nanos` on every token.
//
//   node check.mjs --target http://127.0.0.1:PORT [--transports post-sse,sse,resume,longpoll,shortpoll,ws]
//
// Prints one line per transport and "N passed, M failed"; exits 1 on any failure.
import WebSocket from 'ws';

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const target = opt('target', 'http://127.0.0.1:8080').replace(/\/$/, '');
const transports = opt('transports', 'post-sse,sse,resume,longpoll,shortpoll,ws').split(',').filter(Boolean);
const TIMEOUT_MS = 20000;

const request = (seed) => ({
  prompt: 'check prompt',
  max_tokens: 12,
  seed,
  timing: { ttft_ms: 20, inter_token_ms: 15, jitter_ms: 0 },
  emit_times: true,
});

class Checker {
  constructor() {
    this.events = [];
  }
  add(ev) {
    this.events.push(ev);
  }
  /** Verifies the collected events form one complete stream; returns its text. */
  verify() {
    const ev = this.events;
    if (ev.length === 0) throw new Error('no events');
    ev.forEach((e, i) => {
      if (e.seq !== i + 1) throw new Error(`event ${i} has seq ${e.seq}, expected ${i + 1}`);
    });
    const last = ev[ev.length - 1];
    if (last.type !== 'done') throw new Error(`last event is ${last.type}, not done`);
    const tokens = ev.slice(0, -1);
    if (tokens.some((t) => t.type !== 'token')) throw new Error('a non-token event before the terminal one');
    if (last.usage?.completion_tokens !== tokens.length) {
      throw new Error(`usage.completion_tokens ${last.usage?.completion_tokens} != ${tokens.length} tokens`);
    }
    const now = Date.now() * 1e6;
    for (const t of tokens) {
      if (!Number.isFinite(t.emitted_at_unix_nanos) || Math.abs(now - t.emitted_at_unix_nanos) > 120e9) {
        throw new Error(`token seq ${t.seq} has emitted_at_unix_nanos ${t.emitted_at_unix_nanos}`);
      }
    }
    return tokens.map((t) => t.text).join('');
  }
}

async function post(body, headers = {}) {
  return fetch(`${target}/v1/streams`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
}

async function create(seed) {
  const res = await post(request(seed));
  if (res.status !== 201) throw new Error(`POST /v1/streams: ${res.status} ${await res.text()}`);
  const body = await res.json();
  if (typeof body.id !== 'string' || !body.urls?.events) throw new Error(`bad 201 body ${JSON.stringify(body)}`);
  return body.id;
}

/** Reads an SSE response body; calls onEvent(event) per `data:` frame, stops when it returns false. */
async function readSse(res, onEvent) {
  if (!(res.headers.get('content-type') || '').startsWith('text/event-stream')) {
    throw new Error(`content-type ${res.headers.get('content-type')}`);
  }
  const decoder = new TextDecoder();
  let buf = '';
  let lastId = null;
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, { stream: true });
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let data = null;
      for (const line of frame.split('\n')) {
        if (line.startsWith('data: ')) data = line.slice(6);
        else if (line.startsWith('id: ')) lastId = Number(line.slice(4));
      }
      if (data === null) continue;
      const ev = JSON.parse(data);
      if (ev.seq !== lastId) throw new Error(`id: ${lastId} but seq ${ev.seq}`);
      if (onEvent(ev) === false) return;
    }
  }
}

async function getSse(id, headers = {}, query = '') {
  const res = await fetch(`${target}/v1/streams/${id}/events${query}`, {
    headers: { accept: 'text/event-stream', ...headers },
    signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  if (res.status !== 200) throw new Error(`GET events: ${res.status} ${await res.text()}`);
  return res;
}

const checks = {
  async 'post-sse'(seed) {
    const c = new Checker();
    const res = await post(request(seed), { accept: 'text/event-stream' });
    if (res.status !== 200) throw new Error(`POST-SSE: ${res.status}`);
    if (!res.headers.get('x-stream-id')) throw new Error('no x-stream-id header');
    await readSse(res, (ev) => c.add(ev));
    return c.verify();
  },
  async sse(seed) {
    const id = await create(seed);
    const c = new Checker();
    await readSse(await getSse(id), (ev) => c.add(ev));
    return c.verify();
  },
  async resume(seed) {
    // Read 4 events, drop the connection, resume with Last-Event-ID (which beats ?after=0).
    const id = await create(seed);
    const c = new Checker();
    const ctl = new AbortController();
    const first = await fetch(`${target}/v1/streams/${id}/events`, { signal: ctl.signal });
    try {
      await readSse(first, (ev) => {
        c.add(ev);
        return c.events.length < 4;
      });
    } finally {
      ctl.abort();
    }
    await readSse(await getSse(id, { 'last-event-id': String(c.events.length) }, '?after=0'), (ev) => c.add(ev));
    const text = c.verify();
    const again = await fetch(`${target}/v1/streams/${id}/events?after=${c.events.length}`, {
      signal: AbortSignal.timeout(TIMEOUT_MS),
    });
    if (again.status !== 204) throw new Error(`GET events at the terminal seq: ${again.status}, expected 204`);
    return text;
  },
  async longpoll(seed) {
    const id = await create(seed);
    const c = new Checker();
    let after = 0;
    for (let polls = 0; polls < 200; polls++) {
      const res = await fetch(`${target}/v1/streams/${id}/poll?after=${after}&timeout_ms=5000`, {
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
      if (res.status !== 200) throw new Error(`poll: ${res.status} ${await res.text()}`);
      const body = await res.json();
      for (const ev of body.events) c.add(ev);
      if (body.events.length === 0 && body.next_after !== after) throw new Error('empty batch moved next_after');
      after = body.next_after;
      if (c.events.at(-1)?.type === 'done') return c.verify();
    }
    throw new Error('no terminal event after 200 polls');
  },
  async shortpoll(seed) {
    const id = await create(seed);
    const c = new Checker();
    let after = 0;
    for (let polls = 0; polls < 400; polls++) {
      const res = await fetch(`${target}/v1/streams/${id}?after=${after}`, { signal: AbortSignal.timeout(TIMEOUT_MS) });
      if (res.status !== 200) throw new Error(`short-poll: ${res.status}`);
      const body = await res.json();
      for (const ev of body.events) c.add(ev);
      after = body.next_after;
      if (c.events.at(-1)?.type === 'done') return c.verify();
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error('no terminal event after 400 polls');
  },
  async ws(seed) {
    // One socket starts the stream; a second subscribes with after=3 once 3 events arrived.
    const url = `${target.replace(/^http/, 'ws')}/v1/ws`;
    const open = () =>
      new Promise((resolve, reject) => {
        const s = new WebSocket(url);
        s.once('open', () => resolve(s));
        s.once('error', reject);
      });
    const a = await open();
    const b = await open();
    try {
      const ca = new Checker();
      const cb = new Checker();
      let streamId = null;
      const done = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('timed out')), TIMEOUT_MS);
        let finished = 0;
        const finish = () => {
          if (++finished === 2) {
            clearTimeout(timer);
            resolve();
          }
        };
        b.on('message', (data) => {
          const m = JSON.parse(data.toString());
          if (m.type === 'error') reject(new Error(`socket b: ${data}`));
          if (m.stream_id !== streamId) return;
          cb.add(m);
          if (m.type === 'done') finish();
        });
        a.on('message', (data) => {
          const m = JSON.parse(data.toString());
          if (m.type === 'started') {
            if (m.request_id !== 'r1') reject(new Error('started without request_id'));
            streamId = m.stream_id;
            return;
          }
          if (m.type === 'error') reject(new Error(`socket a: ${data}`));
          if (m.stream_id !== streamId) reject(new Error(`event without the stream's id: ${data}`));
          ca.add(m);
          if (ca.events.length === 3) b.send(JSON.stringify({ type: 'subscribe', stream_id: streamId, after: 3 }));
          if (m.type === 'done') finish();
        });
      });
      a.send(JSON.stringify({ type: 'start', request_id: 'r1', request: request(seed) }));
      await done;
      const text = ca.verify();
      if (cb.events[0]?.seq !== 4) throw new Error(`subscribe after=3 began at seq ${cb.events[0]?.seq}`);
      cb.events = ca.events.slice(0, 3).concat(cb.events);
      if (cb.verify() !== text) throw new Error('the subscriber got a different text');
      const pong = new Promise((resolve) => a.once('message', (d) => resolve(JSON.parse(d.toString()))));
      a.send(JSON.stringify({ type: 'ping', id: 7 }));
      const p = await pong;
      if (p.type !== 'pong' || p.id !== 7) throw new Error(`ping answered ${JSON.stringify(p)}`);
      return text;
    } finally {
      a.close();
      b.close();
    }
  },
};

let passed = 0;
let failed = 0;
const texts = new Map();
for (const name of transports) {
  const fn = checks[name];
  if (!fn) {
    console.error(`unknown transport ${name}; known: ${Object.keys(checks).join(', ')}`);
    process.exit(2);
  }
  try {
    const text = await fn(7);
    texts.set(name, text);
    const same = [...texts.values()].every((t) => t === text);
    if (!same) throw new Error('same request (seed 7) gave a different text than another transport');
    console.log(`ok   ${name}: ${JSON.stringify(text).slice(0, 60)}`);
    passed += 1;
  } catch (err) {
    console.log(`FAIL ${name}: ${err.message}`);
    failed += 1;
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
