'use strict';
// Origin and publisher behind Pushpin, the fan-out peer of tokenfan's benchmarks (watch and
// longpoll). Clients talk to Pushpin; Pushpin proxies every request here, and this process tells
// it, with GRIP response headers, which connections to hold open on which channel. Tokens reach
// the held connections by being published to Pushpin's HTTP publish endpoint.
//
//   POST   /v1/streams               201 {id,status,urls}; starts the stream's timer
//   GET    /v1/streams/:id/events    history so far as SSE + Grip-Hold: stream on channel <id>
//   GET    /v1/streams/:id/poll      events after N at once, else Grip-Hold: response (timeout)
//   GET    /v1/streams/:id           short-poll (answered here, through Pushpin's proxy)
//   DELETE /v1/streams/:id           stop
//
// Every event is published once, as one item on channel <id> with id = "<id>:<seq>" and
// prev-id = "<id>:<seq - 1>" (ids are unique across channels), in two formats: `http-stream`
// (the SSE frame, for held EventSource connections) and `http-response` (the long-poll answer
// for after = seq - 1). After the terminal event an `http-stream` `close` item ends the held SSE
// responses.
//
// Long-poll holds carry `prev-id` = the last seq the origin had: if a publish raced the hold
// (the item arrived before Pushpin registered it), the next item's prev-id does not match and
// Pushpin retries the poll at this origin, which answers from history. Nothing is lost.
//
// SSE holds are plain subscriptions by default (no prev-id, no next link). The watch scenario's
// viewers subscribe right after the stream is created, before its first token, so the race
// above does not arise unless subscribing takes longer than the time to first token (the
// loadgen would then count lost seqs). PUSHPIN_RELIABLE_SSE=1 adds `prev-id` and
// `Grip-Link: <...?recover=1>; rel=next`, Pushpin's reliable mode: on a gap it fetches that link
// with `Grip-Last: <id>; last-id=<id>:<seq>` and appends the answer. It is not the default
// because Pushpin 1.36 also refreshes every new channel's stream holds through that link about
// a second after the channel's first subscription, through an update queue limited to 10 per
// second for the whole process; with one channel per stream, holds then stall for seconds
// once more than about 10 streams start per second.
//
// A hold is answered only once Pushpin has acknowledged every item the stream published so far,
// so an item still in flight cannot reach Pushpin after the hold and be delivered twice (it is
// in the answer's history) or look like a gap to a long-poll.
//
// Items are sent in batches (`{"items":[...]}`): every event due in one event-loop turn goes in
// one POST, and only one POST is in flight at a time, so items reach Pushpin in publish order.
//
//   node origin.js --listen 127.0.0.1:0 --publish http://127.0.0.1:5561/publish/
//   (env LISTEN, PUBLISH_URL; prints "listening on http://ADDR")

const http = require('node:http');
const { RequestError, parseRequest, runSchedule, newStreamId } = require('../common/streams.js');

const HISTORY_TTL_MS = Number(process.env.HISTORY_TTL_SECS ?? 600) * 1000;
const LONGPOLL_DEFAULT_MS = 25000;
const LONGPOLL_MAX_MS = 55000;
const MAX_BODY_BYTES = 256 * 1024;
// Pushpin refuses publish bodies over push_in_http_max_body_size (1,000,000 bytes by default).
const MAX_PUBLISH_BYTES = 900 * 1000;
const RELIABLE_SSE = process.env.PUSHPIN_RELIABLE_SSE === '1';

function arg(name, envName, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0) return process.argv[i + 1];
  return process.env[envName] || dflt;
}

const publishUrl = new URL(arg('publish', 'PUBLISH_URL', 'http://127.0.0.1:5561/publish/'));

// ---------------------------------------------------------------- publishing

const publishAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
/** Serialised items waiting for the next POST. */
let pending = [];
let pendingBytes = 0;
let inFlight = false;
let flushScheduled = false;
const publishStats = { posts: 0, items: 0, failures: 0 };
/** Items are numbered in publish order; Pushpin has answered for every item up to `acked`. */
let published = 0;
let acked = 0;
/** Callbacks waiting for `acked` to reach their number. */
let ackWaiters = [];

/** Queues an item for Pushpin; returns its number (see `whenAcked`). */
function publish(item) {
  const json = JSON.stringify(item);
  pending.push(json);
  pendingBytes += json.length + 1;
  published += 1;
  if (!flushScheduled && !inFlight) {
    flushScheduled = true;
    setImmediate(flush);
  }
  return published;
}

/** Runs `fn` once Pushpin has taken item number `n` (at once if it already has). */
function whenAcked(n, fn) {
  if (acked >= n) fn();
  else ackWaiters.push({ n, fn });
}

function advanceAcked(count) {
  acked += count;
  if (ackWaiters.length === 0) return;
  const due = ackWaiters.filter((w) => w.n <= acked);
  ackWaiters = ackWaiters.filter((w) => w.n > acked);
  for (const w of due) w.fn();
}

function flush() {
  flushScheduled = false;
  if (inFlight || pending.length === 0) return;
  let n = 0;
  let bytes = 0;
  while (n < pending.length && (n === 0 || bytes + pending[n].length < MAX_PUBLISH_BYTES)) {
    bytes += pending[n].length + 1;
    n += 1;
  }
  const batch = pending.slice(0, n);
  pending = pending.slice(n);
  pendingBytes -= bytes;
  const body = `{"items":[${batch.join(',')}]}`;
  inFlight = true;
  const req = http.request(publishUrl, {
    method: 'POST',
    agent: publishAgent,
    headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
  }, (res) => {
    res.resume();
    res.on('end', () => {
      if (res.statusCode !== 200) {
        publishStats.failures += 1;
        console.error(`publish: ${res.statusCode} for ${batch.length} items`);
      }
      done();
    });
  });
  req.on('error', (err) => {
    publishStats.failures += 1;
    console.error(`publish: ${err.message}`);
    done();
  });
  req.end(body);
  publishStats.posts += 1;
  publishStats.items += batch.length;

  function done() {
    inFlight = false;
    // A failed POST is counted and not retried: its items count as taken so nothing waits forever.
    advanceAcked(batch.length);
    if (pending.length > 0) flush();
  }
}

// ---------------------------------------------------------------- streams

/** @type {Map<string, Stream>} */
const streams = new Map();

class Stream {
  constructor(spec) {
    this.id = newStreamId();
    this.spec = spec;
    /** events[seq - 1] = {seq, type, json, sse} */
    this.events = [];
    this.status = 'running';
    /** Number of this stream's last published item (0: none yet). */
    this.lastPublished = 0;
    this.handle = runSchedule(spec, (event) => this.push(event));
  }

  get running() {
    return this.status === 'running';
  }

  push(event) {
    const json = JSON.stringify(event);
    const entry = { seq: event.seq, type: event.type, json, sse: `id: ${event.seq}\nevent: ${event.type}\ndata: ${json}\n\n` };
    this.events.push(entry);
    if (event.type !== 'token') {
      this.status = event.finish_reason === 'cancelled' ? 'cancelled' : 'done';
      setTimeout(() => streams.delete(this.id), HISTORY_TTL_MS).unref();
    }
    this.lastPublished = publish({
      channel: this.id,
      id: this.itemId(entry.seq),
      'prev-id': this.itemId(entry.seq - 1),
      formats: {
        'http-stream': { content: entry.sse },
        'http-response': {
          headers: { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' },
          body: this.pollBody(entry.seq - 1),
        },
      },
    });
    if (!this.running) {
      this.lastPublished = publish({
        channel: this.id,
        id: `${this.itemId(entry.seq)}-end`,
        'prev-id': this.itemId(entry.seq),
        formats: { 'http-stream': { action: 'close' } },
      });
    }
  }

  /** Publish ids are `<stream id>:<seq>`: unique across channels (Pushpin caches recent ids). */
  itemId(seq) {
    return `${this.id}:${seq}`;
  }

  checkCursor(after) {
    const limit = this.running ? this.spec.maxTokens + 1 : this.events.length;
    if (after > limit) {
      throw new RequestError(400, 'cursor_out_of_range',
        `after=${after} is beyond the last event of the stream (seq ${this.events.length})`);
    }
  }

  pollBody(after) {
    const list = this.events.slice(after);
    const next = list.length > 0 ? list[list.length - 1].seq : after;
    const status = list.length > 0 && list[list.length - 1].type === 'token' ? 'running' : this.status;
    return `{"stream_id":"${this.id}","status":"${status}","events":[${list.map((e) => e.json).join(',')}],"next_after":${next}}`;
  }

  sseFrom(after) {
    let out = '';
    for (let i = after; i < this.events.length; i++) out += this.events[i].sse;
    return out;
  }
}

// ---------------------------------------------------------------- HTTP

function sendJson(res, status, body, headers = {}) {
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function sendError(res, err) {
  if (err instanceof RequestError) {
    sendJson(res, err.status, err.body());
  } else {
    console.error(err);
    sendJson(res, 500, { error: { code: 'internal', message: 'internal error' } });
  }
}

function parseCursor(value, what) {
  if (value === null || value === undefined) return 0;
  const s = String(value).trim();
  if (s === '') return 0;
  if (!/^\d{1,10}$/.test(s)) throw new RequestError(400, 'invalid_cursor', `${what}: ${JSON.stringify(value)} is not a seq`);
  return Number(s);
}

/** `Grip-Last: <channel>; last-id=<seq>` on Pushpin's recovery requests. */
function gripLastId(req) {
  const h = req.headers['grip-last'];
  if (!h) return null;
  const m = /last-id=[^;,\s]*:(\d+)/.exec(h);
  if (!m) return null;
  const seq = Number.parseInt(m[1], 10);
  return Number.isFinite(seq) ? seq : null;
}

function readBody(req, res, then) {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY_BYTES) {
      sendJson(res, 413, { error: { code: 'body_too_large', message: 'the body is over 256 KiB' } });
      req.destroy();
      return;
    }
    chunks.push(c);
  });
  req.on('end', () => {
    if (size > MAX_BODY_BYTES) return;
    then(Buffer.concat(chunks).toString('utf8'));
  });
}

function createStream(req, res) {
  if (!/^application\/([\w.+-]*\+)?json\b/i.test(req.headers['content-type'] || '')) {
    sendJson(res, 415, { error: { code: 'unsupported_media_type', message: 'send Content-Type: application/json' } });
    return;
  }
  readBody(req, res, (text) => {
    let spec;
    try {
      let body;
      try {
        body = JSON.parse(text);
      } catch (err) {
        throw new RequestError(400, 'invalid_json', err.message);
      }
      spec = parseRequest(body);
    } catch (err) {
      sendError(res, err);
      return;
    }
    const stream = new Stream(spec);
    streams.set(stream.id, stream);
    const base = `/v1/streams/${stream.id}`;
    sendJson(res, 201, {
      id: stream.id,
      status: 'running',
      urls: { events: `${base}/events`, poll: `${base}/poll`, status: base, ws: '/v1/ws' },
    }, { 'x-stream-id': stream.id, location: base });
  });
}

/**
 * Runs `answer` (a hold) once Pushpin has taken every item this stream published so far. An item
 * still on its way could otherwise reach Pushpin after the hold is registered and be delivered
 * twice (it is in the answer's history too) or, to a long-poll, look like a gap. Gives up after a
 * few rounds so a stream that publishes faster than Pushpin acknowledges is still answered.
 */
function whenSettled(stream, req, answer, rounds = 0) {
  if (req.socket.destroyed) return;
  if (stream.lastPublished <= acked || rounds >= 3) {
    answer();
    return;
  }
  whenAcked(stream.lastPublished, () => whenSettled(stream, req, answer, rounds + 1));
}

function events(req, res, stream, url) {
  const recovering = gripLastId(req);
  let cursor;
  try {
    if (recovering !== null) {
      cursor = recovering;
    } else {
      const lastEventId = (req.headers['last-event-id'] || '').trim();
      cursor = lastEventId !== '' ? parseCursor(lastEventId, 'Last-Event-ID') : parseCursor(url.searchParams.get('after'), 'after');
    }
    stream.checkCursor(cursor);
  } catch (err) {
    sendError(res, err);
    return;
  }
  if (recovering === null && !stream.running && cursor === stream.events.length) {
    res.writeHead(204);
    res.end();
    return;
  }
  const answer = () => {
    const headers = {
      'Content-Type': 'text/event-stream',
      'Cache-Control': 'no-cache',
      'X-Accel-Buffering': 'no',
      'x-stream-id': stream.id,
    };
    let body = recovering === null ? 'retry: 1000\n\n' : '';
    body += stream.sseFrom(cursor);
    if (stream.running) {
      // Hold the response open on the stream's channel.
      headers['Grip-Hold'] = 'stream';
      headers['Grip-Keep-Alive'] = ': heartbeat\\n\\n; format=cstring; timeout=15';
      if (RELIABLE_SSE) {
        // Positioned at the last event sent; a gap makes Pushpin fetch the next link.
        headers['Grip-Channel'] = `${stream.id}; prev-id=${stream.itemId(stream.events.length)}`;
        headers['Grip-Link'] = `</v1/streams/${stream.id}/events?recover=1>; rel=next`;
      } else {
        headers['Grip-Channel'] = stream.id;
      }
    }
    headers['Content-Length'] = Buffer.byteLength(body);
    res.writeHead(200, headers);
    res.end(body);
  };
  if (stream.running) whenSettled(stream, req, answer);
  else answer();
}

function poll(req, res, stream, url) {
  let after;
  let timeoutMs = LONGPOLL_DEFAULT_MS;
  try {
    after = parseCursor(url.searchParams.get('after'), 'after');
    stream.checkCursor(after);
    const t = url.searchParams.get('timeout_ms');
    if (t !== null) {
      timeoutMs = Number(t);
      if (!/^\d+$/.test(t) || timeoutMs > LONGPOLL_MAX_MS) {
        throw new RequestError(400, 'invalid_request', `timeout_ms: ${JSON.stringify(t)} is not an integer in 0..=${LONGPOLL_MAX_MS}`);
      }
    }
  } catch (err) {
    sendError(res, err);
    return;
  }
  const answerNow = () => sendJson(res, 200, stream.pollBody(after), { 'Cache-Control': 'no-store' });
  if (stream.events.length > after || !stream.running || timeoutMs === 0) {
    answerNow();
    return;
  }
  // Nothing yet: Pushpin holds the request until the next event is published on the channel;
  // at the timeout it answers with this body (an empty batch). Grip-Timeout is in seconds.
  whenSettled(stream, req, () => {
    if (stream.events.length > after || !stream.running) {
      answerNow();
      return;
    }
    sendJson(res, 200, stream.pollBody(after), {
      'Cache-Control': 'no-store',
      'Grip-Hold': 'response',
      'Grip-Channel': `${stream.id}; prev-id=${stream.itemId(stream.events.length)}`,
      'Grip-Timeout': String(Math.max(1, Math.round(timeoutMs / 1000))),
    });
  });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://origin');
  const path = url.pathname;
  if (path === '/healthz' || path === '/readyz') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end('ok');
    return;
  }
  if (path === '/v1/streams') {
    if (req.method === 'POST') createStream(req, res);
    else sendJson(res, 405, { error: { code: 'method_not_allowed', message: 'use POST' } });
    return;
  }
  const m = /^\/v1\/streams\/([^/]+)(\/events|\/poll)?$/.exec(path);
  if (!m) {
    sendJson(res, 404, { error: { code: 'not_found', message: `no route for ${req.method} ${path}` } });
    return;
  }
  const stream = streams.get(m[1]);
  if (!stream) {
    sendJson(res, 404, { error: { code: 'stream_not_found', message: 'no such stream' } });
    return;
  }
  const kind = m[2] || '';
  if (req.method === 'DELETE' && kind === '') {
    const wasRunning = stream.handle.cancel();
    sendJson(res, wasRunning ? 202 : 200, { stream_id: stream.id, status: stream.status });
  } else if (req.method !== 'GET') {
    sendJson(res, 405, { error: { code: 'method_not_allowed', message: `${req.method} is not allowed here` } });
  } else if (kind === '/events') {
    events(req, res, stream, url);
  } else if (kind === '/poll') {
    poll(req, res, stream, url);
  } else {
    let after;
    try {
      after = parseCursor(url.searchParams.get('after'), 'after');
      stream.checkCursor(after);
    } catch (err) {
      sendError(res, err);
      return;
    }
    sendJson(res, 200, stream.pollBody(after), { 'Cache-Control': 'no-store' });
  }
});
server.keepAliveTimeout = 60000;

const listen = arg('listen', 'LISTEN', '127.0.0.1:0');
const lm = /^(.*):(\d+)$/.exec(listen);
if (!lm) {
  console.error(`--listen must be HOST:PORT, got ${JSON.stringify(listen)}`);
  process.exit(2);
}
server.listen(Number(lm[2]), lm[1], () => {
  const a = server.address();
  console.log(`listening on http://${a.address}:${a.port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    console.error(`publish: ${publishStats.posts} posts, ${publishStats.items} items, ${publishStats.failures} failures, ${pending.length} unsent`);
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
