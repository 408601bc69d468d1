'use strict';
// Benchmark peer: the token-streaming server people write by hand with Node.js and Express.
// It speaks tokenfan's native wire format (docs/protocol.md §3–9) so tokenfan-loadgen measures it
// exactly like tokenfan:
//
//   POST /v1/streams                 201 {id,status,urls}; with Accept: text/event-stream, POST-SSE
//   GET  /v1/streams/:id/events      EventSource SSE, resume by Last-Event-ID or ?after=
//   GET  /v1/streams/:id/poll        long-poll (?after=&timeout_ms=), waits on an EventEmitter
//   GET  /v1/streams/:id             short-poll (?after=)
//   DELETE /v1/streams/:id           stop
//   GET  /v1/ws                      WebSocket (ws): start, subscribe, cancel, unsubscribe, ping
//
// In the classic style: one in-memory Map of streams, each with its event history (an array)
// and an EventEmitter that every attached SSE response, WebSocket and waiting long-poll listens
// on; one setTimeout chain per stream generates the tokens (../common/streams.js). Each event is
// serialised once and the same string is written to every subscriber. What it does not do, unlike
// tokenfan: no coalescing or slow-consumer limit (res.write buffers without bound), no detach
// grace (a stream always runs to its end), history only in this process.
//
//   node server.js [--listen 127.0.0.1:0]       (env LISTEN; prints "listening on http://ADDR")

const http = require('node:http');
const { EventEmitter } = require('node:events');
const express = require('express');
const { WebSocketServer } = require('ws');
const { RequestError, parseRequest, runSchedule, newStreamId } = require('../common/streams.js');

const HISTORY_TTL_MS = Number(process.env.HISTORY_TTL_SECS ?? 600) * 1000;
const HEARTBEAT_MS = 15000;
const WS_PING_MS = 20000;
const WS_MAX_MESSAGE_BYTES = 64 * 1024;
const LONGPOLL_DEFAULT_MS = 25000;
const LONGPOLL_MAX_MS = 55000;

/** @type {Map<string, Stream>} */
const streams = new Map();

class Stream {
  constructor(spec) {
    this.id = newStreamId();
    this.spec = spec;
    /** Events in seq order: events[seq - 1] = {seq, type, json, sse}. */
    this.events = [];
    this.status = 'running';
    this.bus = new EventEmitter();
    this.bus.setMaxListeners(0);
    this.handle = runSchedule(spec, (event) => this.push(event));
  }

  push(event) {
    const json = JSON.stringify(event);
    const entry = {
      seq: event.seq,
      type: event.type,
      json,
      sse: `id: ${event.seq}\nevent: ${event.type}\ndata: ${json}\n\n`,
      ws: null,
    };
    this.events.push(entry);
    if (event.type !== 'token') {
      this.status = event.finish_reason === 'cancelled' ? 'cancelled' : 'done';
      setTimeout(() => streams.delete(this.id), HISTORY_TTL_MS).unref();
    }
    this.bus.emit('event', entry);
  }

  get running() {
    return this.status === 'running';
  }

  /** The WebSocket form of an event: the native JSON with "stream_id" first. */
  wsFrame(entry) {
    if (entry.ws === null) entry.ws = `{"stream_id":"${this.id}",${entry.json.slice(1)}`;
    return entry.ws;
  }

  /** Throws cursor_out_of_range when `after` is beyond what the stream can reach. */
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
    return `{"stream_id":"${this.id}","status":"${this.status}","events":[${list.map((e) => e.json).join(',')}],"next_after":${next}}`;
  }
}

function parseCursor(value, what) {
  if (value === undefined || value === null) return 0;
  const s = String(value).trim();
  if (s === '') return 0;
  if (!/^\d{1,10}$/.test(s)) throw new RequestError(400, 'invalid_cursor', `${what}: ${JSON.stringify(value)} is not a seq`);
  return Number(s);
}

function sendError(res, err) {
  if (err instanceof RequestError) {
    res.status(err.status).json(err.body());
  } else {
    console.error(err);
    res.status(500).json({ error: { code: 'internal', message: 'internal error' } });
  }
}

function lookup(req, res) {
  const stream = streams.get(req.params.id);
  if (!stream) res.status(404).json({ error: { code: 'stream_not_found', message: 'no such stream' } });
  return stream;
}

/** Writes the stream from `cursor` on as SSE: history first, then live events, until the end. */
function streamSse(req, res, stream, cursor) {
  res.writeHead(200, {
    'Content-Type': 'text/event-stream',
    'Cache-Control': 'no-cache',
    'X-Accel-Buffering': 'no',
    'x-stream-id': stream.id,
  });
  let replay = 'retry: 1000\n\n';
  for (let i = cursor; i < stream.events.length; i++) replay += stream.events[i].sse;
  res.write(replay);
  if (!stream.running) {
    res.end();
    return;
  }
  const onEvent = (entry) => {
    if (entry.seq <= cursor) return; // a cursor ahead of the history waits for later events
    res.write(entry.sse);
    if (entry.type !== 'token') {
      cleanup();
      res.end();
    }
  };
  const heartbeat = setInterval(() => res.write(': heartbeat\n\n'), HEARTBEAT_MS);
  const cleanup = () => {
    clearInterval(heartbeat);
    stream.bus.off('event', onEvent);
  };
  stream.bus.on('event', onEvent);
  res.on('close', cleanup);
}

const app = express();
app.disable('x-powered-by');
app.disable('etag');
app.use(express.json({ limit: '256kb', type: ['application/json', 'application/*+json'] }));

app.get('/healthz', (req, res) => res.type('text/plain').send('ok'));
app.get('/readyz', (req, res) => res.type('text/plain').send('ready'));

app.post('/v1/streams', (req, res) => {
  if (!req.is(['application/json', 'application/*+json'])) {
    res.status(415).json({ error: { code: 'unsupported_media_type', message: 'send Content-Type: application/json' } });
    return;
  }
  let spec;
  try {
    spec = parseRequest(req.body);
  } catch (err) {
    sendError(res, err);
    return;
  }
  const stream = new Stream(spec);
  streams.set(stream.id, stream);
  if ((req.get('accept') || '').includes('text/event-stream')) {
    streamSse(req, res, stream, 0);
    return;
  }
  const base = `/v1/streams/${stream.id}`;
  res.status(201).set({ 'x-stream-id': stream.id, location: base }).json({
    id: stream.id,
    status: 'running',
    urls: { events: `${base}/events`, poll: `${base}/poll`, status: base, ws: '/v1/ws' },
  });
});

app.get('/v1/streams/:id/events', (req, res) => {
  const stream = lookup(req, res);
  if (!stream) return;
  let cursor;
  try {
    const lastEventId = (req.get('last-event-id') || '').trim();
    cursor = lastEventId !== '' ? parseCursor(lastEventId, 'Last-Event-ID') : parseCursor(req.query.after, 'after');
    stream.checkCursor(cursor);
  } catch (err) {
    sendError(res, err);
    return;
  }
  if (!stream.running && cursor === stream.events.length) {
    res.status(204).end();
    return;
  }
  streamSse(req, res, stream, cursor);
});

app.get('/v1/streams/:id/poll', (req, res) => {
  const stream = lookup(req, res);
  if (!stream) return;
  let after;
  let timeoutMs = LONGPOLL_DEFAULT_MS;
  try {
    after = parseCursor(req.query.after, 'after');
    stream.checkCursor(after);
    if (req.query.timeout_ms !== undefined) {
      timeoutMs = Number(req.query.timeout_ms);
      if (!/^\d+$/.test(String(req.query.timeout_ms)) || timeoutMs > LONGPOLL_MAX_MS) {
        throw new RequestError(400, 'invalid_request',
          `timeout_ms: ${JSON.stringify(req.query.timeout_ms)} is not an integer in 0..=${LONGPOLL_MAX_MS}`);
      }
    }
  } catch (err) {
    sendError(res, err);
    return;
  }
  res.set('Cache-Control', 'no-store').type('application/json');
  if (stream.events.length > after || !stream.running) {
    res.send(stream.pollBody(after));
    return;
  }
  // Nothing yet: wait for the next event (or the timeout) on the stream's EventEmitter.
  const onEvent = (entry) => {
    if (entry.seq <= after) return;
    done();
    res.send(stream.pollBody(after));
  };
  const timer = setTimeout(() => {
    done();
    res.send(stream.pollBody(after));
  }, timeoutMs);
  const done = () => {
    clearTimeout(timer);
    stream.bus.off('event', onEvent);
  };
  stream.bus.on('event', onEvent);
  res.on('close', done);
});

app.get('/v1/streams/:id', (req, res) => {
  const stream = lookup(req, res);
  if (!stream) return;
  let after;
  try {
    after = parseCursor(req.query.after, 'after');
    stream.checkCursor(after);
  } catch (err) {
    sendError(res, err);
    return;
  }
  res.set('Cache-Control', 'no-store').type('application/json').send(stream.pollBody(after));
});

app.delete('/v1/streams/:id', (req, res) => {
  const stream = lookup(req, res);
  if (!stream) return;
  const wasRunning = stream.handle.cancel();
  res.status(wasRunning ? 202 : 200).json({ stream_id: stream.id, status: stream.status });
});

app.use((req, res) => {
  res.status(404).json({ error: { code: 'not_found', message: `no route for ${req.method} ${req.path}` } });
});

// Body-parser errors (malformed JSON, too large) and anything unexpected.
// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  if (err.type === 'entity.parse.failed') {
    res.status(400).json({ error: { code: 'invalid_json', message: err.message } });
  } else if (err.type === 'entity.too.large') {
    res.status(413).json({ error: { code: 'body_too_large', message: 'the body is over 256 KiB' } });
  } else {
    sendError(res, err);
  }
});

// ---------------------------------------------------------------- WebSocket

const server = http.createServer(app);
const wss = new WebSocketServer({ server, path: '/v1/ws', maxPayload: WS_MAX_MESSAGE_BYTES });

function wsError(ws, code, message, extra) {
  ws.send(JSON.stringify({ type: 'error', code, message, ...extra }));
}

wss.on('connection', (ws) => {
  ws.isAlive = true;
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  /** stream id → its listener on that stream's EventEmitter. */
  const subs = new Map();

  const unsubscribe = (stream) => {
    const fn = subs.get(stream.id);
    if (fn) stream.bus.off('event', fn);
    subs.delete(stream.id);
  };

  const subscribe = (stream, after) => {
    for (let i = after; i < stream.events.length; i++) ws.send(stream.wsFrame(stream.events[i]));
    if (!stream.running) return;
    const onEvent = (entry) => {
      if (entry.seq <= after) return;
      ws.send(stream.wsFrame(entry));
      if (entry.type !== 'token') unsubscribe(stream);
    };
    subs.set(stream.id, onEvent);
    stream.bus.on('event', onEvent);
  };

  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      wsError(ws, 'unsupported_frame', 'binary frames are not supported; send JSON text');
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data.toString('utf8'));
    } catch (err) {
      wsError(ws, 'invalid_json', err.message);
      return;
    }
    if (msg === null || typeof msg !== 'object' || typeof msg.type !== 'string') {
      wsError(ws, 'invalid_message', 'a message needs a string `type`');
      return;
    }
    const echo = typeof msg.request_id === 'string' ? { request_id: msg.request_id } : {};
    switch (msg.type) {
      case 'ping':
        ws.send(JSON.stringify(msg.id === undefined ? { type: 'pong' } : { type: 'pong', id: msg.id }));
        return;
      case 'start': {
        let spec;
        try {
          spec = parseRequest(msg.request);
        } catch (err) {
          if (err instanceof RequestError) wsError(ws, err.code, err.message, echo);
          return;
        }
        const stream = new Stream(spec);
        streams.set(stream.id, stream);
        ws.send(JSON.stringify({ type: 'started', ...echo, stream_id: stream.id }));
        subscribe(stream, 0);
        return;
      }
      case 'subscribe':
      case 'cancel':
      case 'unsubscribe': {
        if (typeof msg.stream_id !== 'string') {
          wsError(ws, 'invalid_message', 'missing field `stream_id`', echo);
          return;
        }
        const stream = streams.get(msg.stream_id);
        if (!stream) {
          wsError(ws, 'stream_not_found', 'no such stream', { stream_id: msg.stream_id, ...echo });
          return;
        }
        if (msg.type === 'subscribe') {
          if (subs.has(stream.id)) {
            wsError(ws, 'already_subscribed', 'this socket is already subscribed to the stream', { stream_id: stream.id, ...echo });
            return;
          }
          let after;
          try {
            after = parseCursor(msg.after ?? 0, 'after');
            stream.checkCursor(after);
          } catch (err) {
            wsError(ws, err.code, err.message, { stream_id: stream.id, ...echo });
            return;
          }
          subscribe(stream, after);
        } else if (msg.type === 'cancel') {
          if (!stream.handle.cancel() && !subs.has(stream.id)) {
            ws.send(stream.wsFrame(stream.events[stream.events.length - 1]));
          }
        } else {
          unsubscribe(stream);
        }
        return;
      }
      default:
        wsError(ws, 'unknown_type', `unknown message type ${JSON.stringify(msg.type)}; expected start, subscribe, cancel, unsubscribe or ping`, echo);
    }
  });

  ws.on('close', () => {
    for (const id of [...subs.keys()]) {
      const stream = streams.get(id);
      if (stream) unsubscribe(stream);
    }
  });
});

// Server pings every 20 s; a socket that missed the previous one is closed (the ws README pattern).
const pinger = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, WS_PING_MS);

// ---------------------------------------------------------------- start

function listenAddress() {
  const i = process.argv.indexOf('--listen');
  const value = i >= 0 ? process.argv[i + 1] : process.env.LISTEN || '127.0.0.1:0';
  const m = /^(.*):(\d+)$/.exec(value || '');
  if (!m) {
    console.error(`--listen must be HOST:PORT, got ${JSON.stringify(value)}`);
    process.exit(2);
  }
  return { host: m[1], port: Number(m[2]) };
}

const { host, port } = listenAddress();
server.listen(port, host, () => {
  const addr = server.address();
  console.log(`listening on http://${addr.address}:${addr.port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    clearInterval(pinger);
    for (const ws of wss.clients) ws.terminate();
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
