// tokenfan demo page: one token stream shown over five web transports, side by side.
// Plain browser JavaScript, no framework, no build step. The wire formats are the ones in
// docs/protocol.md: every transport carries the same native event JSON
//   {"type":"token","seq":1,"text":"Hel"}
//   {"type":"done","seq":42,"finish_reason":"stop","usage":{...}}
//   {"type":"error","seq":42,"code":"...","message":"..."}
//
// Testability contract (used by tests/browser): every panel root has data-panel=NAME and a
// data-state attribute (idle → connecting → open → streaming → done | cancelled | error), one
// element with data-role="output" whose textContent is exactly the concatenation of the token
// texts received, data-stream-id once known and data-duplicates (events dropped because their
// seq was not new). The EventSource panel also has data-reconnects.
'use strict';

(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const streamPath = (id) => `/v1/streams/${encodeURIComponent(id)}`;
  const TERMINAL = new Set(['done', 'cancelled', 'error']);

  // ------------------------------------------------------------------ request settings

  function numberField(sel) {
    const v = $(sel).value.trim();
    return v === '' ? null : Number(v);
  }

  // The request body shared by every panel (POST /v1/streams, WS start). With forceSeed a
  // random seed is chosen and written back to the form, so every panel gets the same answer.
  function buildRequest({ forceSeed = false } = {}) {
    const req = { prompt: $('#prompt').value };
    const maxTokens = numberField('#max-tokens');
    if (maxTokens !== null) req.max_tokens = maxTokens;
    let seed = numberField('#seed');
    if (seed === null && forceSeed) {
      seed = Math.floor(Math.random() * 2 ** 31);
      $('#seed').value = String(seed);
    }
    if (seed !== null) req.seed = seed;
    const timing = {};
    const ttft = numberField('#ttft-ms');
    const itl = numberField('#inter-token-ms');
    if (ttft !== null) timing.ttft_ms = ttft;
    if (itl !== null) timing.inter_token_ms = itl;
    if (Object.keys(timing).length > 0) req.timing = timing;
    const model = $('#model').value;
    if (model) req.model = model;
    return req;
  }

  // ------------------------------------------------------------------ HTTP helpers

  async function httpError(res) {
    let code = `http_${res.status}`;
    let message = res.statusText || 'request failed';
    try {
      const body = await res.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch {
      // not JSON: keep the status line
    }
    const err = new Error(`${res.status} ${code}: ${message}`);
    err.status = res.status;
    err.code = code;
    return err;
  }

  // POST /v1/streams without an SSE Accept: 201 {"id", "urls"}.
  async function createStream(req) {
    const res = await fetch('/v1/streams', {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify(req),
    });
    if (res.status !== 201) throw await httpError(res);
    return res.json();
  }

  // DELETE /v1/streams/{id}: stop the stream for every subscriber.
  function deleteStream(id) {
    return fetch(streamPath(id), { method: 'DELETE' }).catch(() => undefined);
  }

  function sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal?.addEventListener('abort', () => {
        clearTimeout(timer);
        reject(new DOMException('aborted', 'AbortError'));
      }, { once: true });
    });
  }

  // ------------------------------------------------------------------ HTTP version per request

  // nextHopProtocol ("h2", "http/1.1") of the last finished request per path. A request shows
  // up in Resource Timing only once its body is complete, so streams still open fall back to
  // the page's own protocol (same origin, same connection pool).
  const protoByPath = new Map();

  function recordEntries(entries) {
    for (const e of entries) {
      if (!e.nextHopProtocol) continue;
      try {
        protoByPath.set(new URL(e.name).pathname, e.nextHopProtocol);
      } catch {
        // ignore odd entry names
      }
    }
  }

  function pageProtocol() {
    const nav = performance.getEntriesByType('navigation')[0];
    return (nav && nav.nextHopProtocol) || '?';
  }

  function httpVersion(path) {
    if (path && protoByPath.has(path)) return { proto: protoByPath.get(path), measured: true };
    return { proto: pageProtocol(), measured: false };
  }

  function refreshHttpStats() {
    for (const dd of document.querySelectorAll('dd[data-stat="http"][data-path]')) {
      const { proto, measured } = httpVersion(dd.dataset.path);
      dd.textContent = proto;
      dd.title = measured ? 'nextHopProtocol of this request' : 'request still open: protocol of the page';
    }
  }

  recordEntries(performance.getEntriesByType('resource'));
  if ('PerformanceObserver' in window) {
    try {
      new PerformanceObserver((list) => {
        recordEntries(list.getEntries());
        refreshHttpStats();
      }).observe({ type: 'resource', buffered: true });
    } catch {
      // very old browser: fall back to the page protocol
    }
  }
  // Short-polling creates four entries a second; keep the buffer from filling up.
  performance.addEventListener?.('resourcetimingbufferfull', () => performance.clearResourceTimings());

  // ------------------------------------------------------------------ SSE parser

  // A small text/event-stream parser (WHATWG rules): lines end in CRLF, LF or CR; "data" lines
  // are joined with "\n"; "id" persists across events; comment lines (heartbeats) are ignored;
  // an event is dispatched on a blank line; a trailing incomplete event is discarded.
  class SseParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buf = '';
      this.lastId = '';
      this.event = '';
      this.data = [];
    }

    push(text) {
      this.buf += text;
      const re = /\r\n|\n|\r/g;
      let pos = 0;
      let m;
      while ((m = re.exec(this.buf)) !== null) {
        // A lone CR at the very end may be the first half of a CRLF: wait for more input.
        if (m[0] === '\r' && m.index === this.buf.length - 1) break;
        this.line(this.buf.slice(pos, m.index));
        pos = re.lastIndex;
      }
      this.buf = this.buf.slice(pos);
    }

    line(line) {
      if (line === '') {
        if (this.data.length > 0) {
          this.onEvent({ id: this.lastId, event: this.event || 'message', data: this.data.join('\n') });
        }
        this.data = [];
        this.event = '';
        return;
      }
      if (line[0] === ':') return; // comment / heartbeat
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') this.data.push(value);
      else if (field === 'event') this.event = value;
      else if (field === 'id' && !value.includes('\0')) this.lastId = value;
      // "retry" only matters to EventSource; unknown fields are ignored.
    }
  }

  // ------------------------------------------------------------------ stats + output of one stream

  const STAT_LABELS = {
    ttft: 'TTFT ms', rate: 'tok/s', events: 'events', tokens: 'tokens', http: 'HTTP',
    reconnects: 'reconnects', resumed: 'resumed after id', polls: 'requests', streams: 'streams',
  };

  function buildStats(dl, keys) {
    dl.replaceChildren();
    const out = {};
    for (const key of keys) {
      const item = document.createElement('div');
      const dt = document.createElement('dt');
      const dd = document.createElement('dd');
      dt.textContent = STAT_LABELS[key] || key;
      dd.dataset.stat = key;
      dd.textContent = '—';
      item.append(dt, dd);
      dl.append(item);
      out[key] = dd;
    }
    return out;
  }

  function setBadge(badge, state) {
    if (!badge) return;
    badge.textContent = state;
    badge.className = `badge state-${state}`;
  }

  // A view is { root, badge, output, stats, status, onState? }. A Run owns the view while it is
  // the view's current run; events of an older run (a stream replaced by a newer one) are ignored.
  class Run {
    // t0: when the user asked for the stream (TTFT is measured from there).
    constructor(view, httpPath, t0 = performance.now()) {
      this.view = view;
      view.current = this;
      this.httpPath = httpPath || '';
      this.t0 = t0;
      this.tFirst = null;
      this.tLast = null;
      this.events = 0;
      this.tokens = 0;
      this.lastSeq = 0;
      this.duplicates = 0;
      this.terminal = null;
      this.state = 'idle';
      this.textNode = document.createTextNode('');
      view.output.replaceChildren(this.textNode);
      view.root.dataset.duplicates = '0';
      if (view.stats.http) {
        if (this.httpPath) view.stats.http.dataset.path = this.httpPath;
        else delete view.stats.http.dataset.path;
      }
      this.setState('connecting', '');
      this.render();
    }

    get live() {
      return this.view.current === this;
    }

    get finished() {
      return TERMINAL.has(this.state);
    }

    setHttpPath(path) {
      this.httpPath = path;
      if (this.live && this.view.stats.http) this.view.stats.http.dataset.path = path;
      this.render();
    }

    setStreamId(id) {
      if (!this.live) return;
      this.view.root.dataset.streamId = id;
    }

    status(message) {
      if (this.live) this.view.status.textContent = message;
    }

    setState(state, message) {
      if (!this.live) return;
      this.state = state;
      this.view.root.dataset.state = state;
      setBadge(this.view.badge, state);
      if (message !== undefined) this.view.status.textContent = message;
      if (this.view.onState) this.view.onState(state, this);
    }

    // The transport is connected and waiting for the first event.
    opened() {
      if (this.state === 'connecting') this.setState('open');
    }

    fail(message) {
      if (this.finished) return;
      this.setState('error', message);
    }

    cancel(message) {
      if (this.finished) return;
      this.setState('cancelled', message);
    }

    // Apply one native event. Events whose seq is not past the last one are duplicates and are
    // dropped (counted in data-duplicates), so the output stays exactly-once.
    apply(ev) {
      if (!this.live || this.terminal || !ev || typeof ev !== 'object') return;
      if (typeof ev.seq === 'number' && ev.seq <= this.lastSeq) {
        this.duplicates += 1;
        this.view.root.dataset.duplicates = String(this.duplicates);
        if (this.view.onState) this.view.onState(this.state, this);
        return;
      }
      this.events += 1;
      const now = performance.now();
      if (ev.type === 'token') {
        if (this.tFirst === null) this.tFirst = now;
        this.tLast = now;
        // A coalesced event carries several tokens: its seq is the last one's.
        this.tokens += typeof ev.seq === 'number' ? ev.seq - this.lastSeq : 1;
        if (typeof ev.seq === 'number') this.lastSeq = ev.seq;
        this.append(typeof ev.text === 'string' ? ev.text : '');
        if (this.state !== 'streaming') this.setState('streaming');
      } else if (ev.type === 'done') {
        if (typeof ev.seq === 'number') this.lastSeq = ev.seq;
        this.terminal = ev;
        const reason = ev.finish_reason || 'stop';
        const usage = ev.usage ? ` · usage ${ev.usage.prompt_tokens ?? '?'} prompt / ${ev.usage.completion_tokens ?? '?'} completion tokens` : '';
        const state = reason === 'cancelled' ? 'cancelled' : reason === 'error' ? 'error' : 'done';
        this.setState(state, `finished: ${reason}${usage}`);
      } else if (ev.type === 'error') {
        if (typeof ev.seq === 'number') this.lastSeq = ev.seq;
        this.terminal = ev;
        this.setState('error', `error ${ev.code || '?'}: ${ev.message || ''}`);
      }
      this.render();
    }

    append(text) {
      const out = this.view.output;
      const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 24;
      this.textNode.appendData(text);
      if (stick) out.scrollTop = out.scrollHeight;
    }

    render() {
      if (!this.live) return;
      const s = this.view.stats;
      if (s.ttft) s.ttft.textContent = this.tFirst === null ? '—' : String(Math.round(this.tFirst - this.t0));
      if (s.rate) {
        const secs = this.tFirst === null ? 0 : (this.tLast - this.tFirst) / 1000;
        s.rate.textContent = secs > 0 && this.tokens > 1 ? ((this.tokens - 1) / secs).toFixed(1) : '—';
      }
      if (s.events) s.events.textContent = String(this.events);
      if (s.tokens) s.tokens.textContent = String(this.tokens);
      if (s.http) {
        const { proto, measured } = httpVersion(this.httpPath);
        s.http.textContent = proto;
        s.http.title = measured ? 'nextHopProtocol of this request' : 'request still open: protocol of the page';
      }
    }
  }

  function panelView(name, statKeys) {
    const root = $(`[data-panel="${name}"]`);
    return {
      root,
      badge: $('[data-role="state"]', root),
      output: $('[data-role="output"]', root),
      stats: buildStats($('[data-role="stats"]', root), statKeys),
      status: $('[data-role="status"]', root),
      input: $('[data-role="stream-input"]', root),
      button: (action) => $(`[data-action="${action}"]`, root),
    };
  }

  // ------------------------------------------------------------------ stream-id sharing

  // The chat's latest stream id is offered to the other panels, unless the user typed one.
  function announceStream(id) {
    for (const input of document.querySelectorAll('[data-role="stream-input"]')) {
      if (document.activeElement === input) continue;
      if (input.value === '' || input.dataset.auto === '1') {
        input.value = id;
        input.dataset.auto = '1';
      }
    }
  }

  function trackManualInput(input) {
    input.addEventListener('input', () => {
      input.dataset.auto = '0';
    });
  }

  function streamIdFrom(input, run) {
    const id = input.value.trim();
    if (!id) {
      run?.status('enter a stream id first');
      input.focus();
    }
    return id;
  }

  // ------------------------------------------------------------------ Chat: POST + SSE via fetch

  const chat = {
    view: null,
    ctrl: null,
    id: null,
    run: null,

    init() {
      this.view = panelView('chat', ['ttft', 'rate', 'events', 'tokens', 'http']);
      this.view.button('send').addEventListener('click', () => this.send(buildRequest()));
      this.view.button('stop').addEventListener('click', () => this.stop());
      $('#prompt').addEventListener('keydown', (e) => {
        if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) this.send(buildRequest());
      });
      const idEl = $('[data-role="stream-id"]', this.view.root);
      idEl.addEventListener('click', () => {
        if (this.id) navigator.clipboard?.writeText(this.id).catch(() => undefined);
      });
    },

    async send(req) {
      if (this.ctrl) this.stop();
      const ctrl = new AbortController();
      this.ctrl = ctrl;
      this.id = null;
      const run = new Run(this.view, '/v1/streams');
      this.run = run;
      $('[data-role="stream-id"]', this.view.root).textContent = '—';
      this.view.button('stop').disabled = false;
      try {
        const res = await fetch('/v1/streams', {
          method: 'POST',
          headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
          body: JSON.stringify(req),
          signal: ctrl.signal,
          cache: 'no-store',
        });
        if (!res.ok) throw await httpError(res);
        const id = res.headers.get('x-stream-id');
        if (id && run.live) {
          this.id = id;
          run.setStreamId(id);
          $('[data-role="stream-id"]', this.view.root).textContent = id;
          announceStream(id);
        }
        run.opened();
        const parser = new SseParser((msg) => {
          let ev;
          try {
            ev = JSON.parse(msg.data);
          } catch {
            return; // not an event of ours
          }
          run.apply(ev);
        });
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
        }
        if (!run.terminal) run.fail('the response ended without a terminal event');
      } catch (err) {
        if (ctrl.signal.aborted) run.cancel('stopped: request aborted and stream deleted');
        else run.fail(String(err.message || err));
      } finally {
        if (this.ctrl === ctrl) {
          this.ctrl = null;
          this.view.button('stop').disabled = true;
        }
        run.render();
      }
    },

    // Stop = abort the fetch AND delete the stream (disconnect alone is not stop).
    stop() {
      const ctrl = this.ctrl;
      if (!ctrl) return;
      const id = this.id;
      this.ctrl = null;
      this.view.button('stop').disabled = true;
      ctrl.abort();
      if (id) deleteStream(id);
    },
  };

  // ------------------------------------------------------------------ EventSource viewer

  const esPanel = {
    view: null,
    es: null,
    run: null,

    init() {
      this.view = panelView('eventsource', ['ttft', 'rate', 'events', 'tokens', 'http', 'reconnects', 'resumed']);
      trackManualInput(this.view.input);
      this.view.button('attach').addEventListener('click', () => {
        const id = streamIdFrom(this.view.input, this.run);
        if (id) this.attach(id);
      });
      this.view.button('new').addEventListener('click', () => this.startNew(buildRequest()));
      this.view.button('close').addEventListener('click', () => this.detach('closed by you (the stream goes on)'));
    },

    async startNew(req) {
      this.detach();
      const run = new Run(this.view, '/v1/streams');
      this.run = run;
      try {
        const { id } = await createStream(req);
        if (!run.live) return;
        this.view.input.value = id;
        this.view.input.dataset.auto = '0';
        this.attach(id, run.t0);
      } catch (err) {
        run.fail(String(err.message || err));
      }
    },

    attach(id, t0 = performance.now()) {
      this.detach();
      const path = `${streamPath(id)}/events`;
      const run = new Run(this.view, path, t0);
      this.run = run;
      run.setStreamId(id);
      const root = this.view.root;
      let reconnects = 0;
      let lastId = '';
      let lost = false;
      root.dataset.reconnects = '0';
      this.view.stats.reconnects.textContent = '0';
      this.view.stats.resumed.textContent = '—';

      const es = new EventSource(path);
      this.es = es;
      this.view.button('close').disabled = false;

      const onEvent = (e) => {
        if (this.es !== es) return;
        if (e.lastEventId) lastId = e.lastEventId;
        let ev;
        try {
          ev = JSON.parse(e.data);
        } catch {
          return;
        }
        run.apply(ev);
        if (run.terminal) this.closeSource();
      };

      es.addEventListener('open', () => {
        if (this.es !== es) return;
        if (lost) {
          // error → open: EventSource reconnected, sending Last-Event-ID = lastId.
          reconnects += 1;
          root.dataset.reconnects = String(reconnects);
          root.dataset.resumedFrom = lastId;
          this.view.stats.reconnects.textContent = String(reconnects);
          this.view.stats.resumed.textContent = lastId || '0';
          run.status(`reconnected, resumed after id ${lastId || '0'}`);
          lost = false;
        }
        run.opened();
      });
      es.addEventListener('token', onEvent);
      es.addEventListener('done', onEvent);
      es.addEventListener('message', onEvent); // unnamed events, should the server send any
      es.addEventListener('error', (e) => {
        if (this.es !== es) return;
        // "event: error" from the server is a MessageEvent with data; a connection problem is a
        // plain Event.
        if (typeof e.data === 'string') {
          onEvent(e);
          return;
        }
        if (es.readyState === EventSource.CONNECTING) {
          lost = true;
          run.status(`connection lost, reconnecting (Last-Event-ID ${lastId || 'none'})…`);
        } else {
          // CLOSED: the server refused the request (e.g. 404, 410) or answered 204.
          this.closeSource();
          run.fail('EventSource closed by the server before the end of the stream');
        }
      });
    },

    closeSource() {
      if (this.es) this.es.close();
      this.es = null;
      this.view.button('close').disabled = true;
    },

    // Detach the viewer only; the stream itself goes on for others.
    detach(message) {
      const wasOpen = this.es !== null;
      this.closeSource();
      if (wasOpen && message && this.run) this.run.cancel(message);
    },
  };

  // ------------------------------------------------------------------ WebSocket: many streams, one socket

  const wsPanel = {
    root: null,
    sock: null,
    queue: [],
    nextRequest: 1,
    nextPing: 1,
    pings: new Map(),
    pending: new Map(), // request_id → card (start sent, started not yet received)
    streams: new Map(), // stream_id → card
    latest: null,
    reconnectAttempts: 0,
    pingTimer: null,
    stats: null,

    init() {
      this.root = $('[data-panel="ws"]');
      this.stats = buildStats($('[data-role="stats"]', this.root), ['http', 'streams']);
      this.stats.http.textContent = `ws · ${pageProtocol()}`;
      this.stats.http.title = 'WebSocket: HTTP/1.1 Upgrade, or HTTP/2 extended CONNECT when the page is on h2';
      this.stats.streams.textContent = '0';
      const input = $('[data-role="stream-input"]', this.root);
      trackManualInput(input);
      $('[data-action="start"]', this.root).addEventListener('click', () => this.start(buildRequest()));
      $('[data-action="subscribe"]', this.root).addEventListener('click', () => {
        const id = input.value.trim();
        if (id) this.subscribe(id);
        else input.focus();
      });
    },

    url() {
      return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/v1/ws`;
    },

    setSocketLabel(text) {
      $('[data-role="socket"]', this.root).textContent = text;
    },

    panelStatus(text) {
      $('[data-role="status"]', this.root).textContent = text;
    },

    connect() {
      if (this.sock && this.sock.readyState <= WebSocket.OPEN) return;
      const sock = new WebSocket(this.url());
      this.sock = sock;
      this.setSocketLabel('connecting');
      sock.addEventListener('open', () => {
        if (this.sock !== sock) return;
        this.reconnectAttempts = 0;
        this.setSocketLabel('open');
        // Streams interrupted by a lost socket resume where they were.
        for (const card of this.streams.values()) {
          if (card.interrupted && !card.run.finished) {
            card.interrupted = false;
            this.queue.unshift({ type: 'subscribe', stream_id: card.streamId, after: card.run.lastSeq });
            if (card.cancelRequested) this.queue.push({ type: 'cancel', stream_id: card.streamId });
            card.run.status(`socket reconnected, resubscribed after seq ${card.run.lastSeq}`);
          }
        }
        const queued = this.queue;
        this.queue = [];
        for (const msg of queued) sock.send(JSON.stringify(msg));
        clearInterval(this.pingTimer);
        this.pingTimer = setInterval(() => this.ping(), 20000);
      });
      sock.addEventListener('message', (e) => {
        if (this.sock === sock) this.onMessage(e.data);
      });
      sock.addEventListener('close', (e) => {
        if (this.sock !== sock) return;
        this.sock = null;
        clearInterval(this.pingTimer);
        this.setSocketLabel(`closed (${e.code}${e.reason ? ` ${e.reason}` : ''})`);
        for (const card of this.pending.values()) card.run.fail('socket closed before the stream started');
        this.pending.clear();
        // Whatever was queued is re-derived on reconnect: unfinished streams resubscribe.
        this.queue = [];
        let running = 0;
        for (const card of this.streams.values()) {
          if (!card.run.finished) {
            card.interrupted = true;
            running += 1;
            card.run.status('socket lost, will resubscribe…');
          }
        }
        if (running > 0 && this.reconnectAttempts < 5) {
          this.reconnectAttempts += 1;
          setTimeout(() => this.connect(), 500 * 2 ** (this.reconnectAttempts - 1));
        } else {
          for (const card of this.streams.values()) {
            if (!card.run.finished) card.run.fail('socket closed');
          }
        }
      });
    },

    send(msg) {
      if (this.sock && this.sock.readyState === WebSocket.OPEN) {
        this.sock.send(JSON.stringify(msg));
      } else {
        this.queue.push(msg);
        this.connect();
      }
    },

    ping() {
      const id = this.nextPing++;
      this.pings.set(id, performance.now());
      this.send({ type: 'ping', id });
    },

    // One card per stream: its own output, state, stats and cancel button.
    newCard(label) {
      const el = document.createElement('div');
      el.className = 'ws-stream';
      el.innerHTML = `
        <div class="ws-stream-head">
          <code class="ws-id"></code>
          <span class="badge"></span>
          <button type="button" class="small">Cancel</button>
        </div>
        <pre class="output"></pre>
        <dl class="stats mini"></dl>
        <p class="status"></p>`;
      $('.ws-id', el).textContent = label;
      const box = $('[data-role="streams"]', this.root);
      box.prepend(el);
      // Keep the page bounded: drop the oldest finished cards.
      const cards = [...box.querySelectorAll('.ws-stream')];
      for (const old of cards.slice(6)) {
        if (TERMINAL.has(old.dataset.state)) old.remove();
      }
      // The newest stream's output is the panel's data-role="output".
      for (const pre of box.querySelectorAll('pre.output')) pre.dataset.role = 'stream-output';
      const output = $('pre.output', el);
      output.dataset.role = 'output';
      const card = {
        el,
        streamId: null,
        requestId: null,
        cancelRequested: false,
        interrupted: false,
        run: null,
      };
      const view = {
        root: el,
        badge: $('.badge', el),
        output,
        stats: buildStats($('dl', el), ['ttft', 'rate', 'events', 'tokens']),
        status: $('.status', el),
        onState: (state) => this.cardState(card, state),
      };
      this.latest = card;
      card.run = new Run(view, '');
      $('button', el).addEventListener('click', () => this.cancel(card));
      return card;
    },

    cardState(card, state) {
      if (TERMINAL.has(state)) $('button', card.el).disabled = true;
      if (this.latest === card) {
        // The panel root mirrors its newest stream.
        this.root.dataset.state = state;
        this.root.dataset.duplicates = card.el.dataset.duplicates || '0';
        setBadge($('[data-role="state"]', this.root), state);
        if (card.streamId) this.root.dataset.streamId = card.streamId;
        else delete this.root.dataset.streamId;
      }
      let active = 0;
      for (const c of this.streams.values()) if (!c.run.finished) active += 1;
      this.stats.streams.textContent = String(active + this.pending.size);
    },

    start(req) {
      const requestId = `r${this.nextRequest++}`;
      const card = this.newCard(`request ${requestId}`);
      card.requestId = requestId;
      this.pending.set(requestId, card);
      this.cardState(card, card.run.state);
      this.send({ type: 'start', request_id: requestId, request: req });
    },

    subscribe(streamId) {
      const existing = this.streams.get(streamId);
      if (existing && !existing.run.finished) {
        this.panelStatus(`already showing ${streamId}`);
        return;
      }
      const card = this.newCard(streamId);
      card.streamId = streamId;
      card.run.setStreamId(streamId);
      this.streams.set(streamId, card);
      this.cardState(card, card.run.state);
      this.send({ type: 'subscribe', stream_id: streamId, after: 0 });
    },

    // The terminal event (finish_reason "cancelled") is the server's answer to cancel.
    cancel(card) {
      if (card.run.finished) return;
      card.cancelRequested = true;
      card.run.status('cancel sent…');
      if (card.streamId) this.send({ type: 'cancel', stream_id: card.streamId });
    },

    onMessage(data) {
      let m;
      try {
        m = JSON.parse(data);
      } catch {
        this.panelStatus('non-JSON message from the server');
        return;
      }
      switch (m.type) {
        case 'started': {
          const card = this.pending.get(m.request_id);
          if (!card) return;
          this.pending.delete(m.request_id);
          card.streamId = m.stream_id;
          card.run.setStreamId(m.stream_id);
          this.streams.set(m.stream_id, card);
          $('.ws-id', card.el).textContent = m.stream_id;
          card.run.opened();
          this.cardState(card, card.run.state);
          if (card.cancelRequested) this.send({ type: 'cancel', stream_id: m.stream_id });
          break;
        }
        case 'token':
        case 'done': {
          const card = this.streams.get(m.stream_id);
          if (card) card.run.apply(m);
          break;
        }
        case 'error': {
          const card = (m.stream_id && this.streams.get(m.stream_id)) || (m.request_id && this.pending.get(m.request_id));
          if (m.request_id) this.pending.delete(m.request_id);
          if (!card) {
            this.panelStatus(`protocol error ${m.code}: ${m.message}`);
          } else if (typeof m.seq === 'number') {
            card.run.apply(m); // terminal stream error
          } else if (m.code === 'already_subscribed') {
            card.run.status('already subscribed on this socket');
          } else {
            card.run.fail(`error ${m.code}: ${m.message}`);
          }
          break;
        }
        case 'pong': {
          const sent = this.pings.get(m.id);
          if (sent !== undefined) {
            this.pings.delete(m.id);
            $('[data-role="rtt"]', this.root).textContent = `ping ${Math.round(performance.now() - sent)} ms`;
          }
          break;
        }
        default:
          break;
      }
    },
  };

  // ------------------------------------------------------------------ long-poll and short-poll

  class PollPanel {
    // mode "long": GET /v1/streams/{id}/poll?after=N&timeout_ms=25000, back to back.
    // mode "short": GET /v1/streams/{id}?after=N every 250 ms.
    constructor(name, mode) {
      this.mode = mode;
      this.view = panelView(name, ['ttft', 'rate', 'events', 'tokens', 'http', 'polls']);
      this.ctrl = null;
      this.id = null;
      this.run = null;
      trackManualInput(this.view.input);
      this.view.button('attach').addEventListener('click', () => {
        const id = streamIdFrom(this.view.input, this.run);
        if (id) this.attach(id);
      });
      this.view.button('new').addEventListener('click', () => this.startNew(buildRequest()));
      this.view.button('stop').addEventListener('click', () => this.stop());
    }

    path(id) {
      return this.mode === 'long' ? `${streamPath(id)}/poll` : streamPath(id);
    }

    url(id, after) {
      return this.mode === 'long'
        ? `${this.path(id)}?after=${after}&timeout_ms=25000`
        : `${this.path(id)}?after=${after}`;
    }

    async startNew(req) {
      this.abort();
      const run = new Run(this.view, '/v1/streams');
      this.run = run;
      try {
        const { id } = await createStream(req);
        if (!run.live) return;
        this.view.input.value = id;
        this.view.input.dataset.auto = '0';
        this.attach(id, run.t0);
      } catch (err) {
        run.fail(String(err.message || err));
      }
    }

    async attach(id, t0 = performance.now()) {
      this.abort();
      const ctrl = new AbortController();
      this.ctrl = ctrl;
      this.id = id;
      const run = new Run(this.view, this.path(id), t0);
      this.run = run;
      run.setStreamId(id);
      this.view.button('stop').disabled = false;
      let after = 0;
      let polls = 0;
      let failures = 0;
      try {
        while (!ctrl.signal.aborted) {
          let res;
          try {
            res = await fetch(this.url(id, after), {
              signal: ctrl.signal,
              headers: { accept: 'application/json' },
              cache: 'no-store',
            });
          } catch (err) {
            if (ctrl.signal.aborted) throw err;
            failures += 1;
            if (failures > 5) throw err;
            run.status(`network error (${err.message}), retrying…`);
            await sleep(250 * 2 ** failures, ctrl.signal);
            continue;
          }
          if (!res.ok) throw await httpError(res);
          const body = await res.json();
          failures = 0;
          polls += 1;
          this.view.stats.polls.textContent = String(polls);
          run.opened();
          const events = Array.isArray(body.events) ? body.events : [];
          for (const ev of events) run.apply(ev);
          if (typeof body.next_after === 'number') after = Math.max(after, body.next_after);
          after = Math.max(after, run.lastSeq);
          if (run.terminal) break;
          if (body.status && body.status !== 'running' && events.length === 0) {
            run.fail(`stream is ${body.status} but its terminal event never arrived`);
            break;
          }
          if (this.mode === 'short') await sleep(250, ctrl.signal);
        }
      } catch (err) {
        if (ctrl.signal.aborted) run.cancel('stopped: polling ended and stream deleted');
        else run.fail(String(err.message || err));
      } finally {
        if (this.ctrl === ctrl) {
          this.ctrl = null;
          this.view.button('stop').disabled = true;
        }
        run.render();
      }
    }

    abort() {
      const ctrl = this.ctrl;
      this.ctrl = null;
      this.view.button('stop').disabled = true;
      if (ctrl) ctrl.abort();
    }

    // Stop = end polling AND delete the stream.
    stop() {
      if (!this.ctrl) return;
      const id = this.id;
      this.abort();
      if (id) deleteStream(id);
    }
  }

  // ------------------------------------------------------------------ wiring

  let longPoll = null;
  let shortPoll = null;

  // The same request (same seed) on every transport at once: the answers must be identical.
  function runAll() {
    const req = buildRequest({ forceSeed: true });
    chat.send(req);
    esPanel.startNew(req);
    wsPanel.start(req);
    longPoll.startNew(req);
    shortPoll.startNew(req);
  }

  async function loadModels() {
    try {
      const res = await fetch('/v1/models', { headers: { accept: 'application/json' } });
      if (!res.ok) return;
      const body = await res.json();
      const list = Array.isArray(body.data) ? body.data : Array.isArray(body.models) ? body.models : [];
      const select = $('#model');
      for (const m of list) {
        const id = typeof m === 'string' ? m : m && (m.id || m.name);
        if (!id) continue;
        const opt = document.createElement('option');
        opt.value = id;
        opt.textContent = id;
        select.append(opt);
      }
    } catch {
      // the model list is a convenience only
    }
  }

  function init() {
    // No inline handlers (the edge serves a strict Content-Security-Policy): forms never submit.
    for (const form of document.querySelectorAll('form')) {
      form.addEventListener('submit', (e) => e.preventDefault());
    }
    chat.init();
    esPanel.init();
    wsPanel.init();
    longPoll = new PollPanel('longpoll', 'long');
    shortPoll = new PollPanel('shortpoll', 'short');
    $('#run-all').addEventListener('click', runAll);
    $('#page-proto').textContent = pageProtocol();
    refreshHttpStats();
    loadModels();
    document.documentElement.dataset.ready = '1';
  }

  // A small handle for the console (and tests): window.tokenfan.runAll() etc.
  window.tokenfan = {
    runAll: () => runAll(),
    chat,
    eventSource: esPanel,
    ws: wsPanel,
    get longPoll() { return longPoll; },
    get shortPoll() { return shortPoll; },
    SseParser,
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
