'use strict';
// What the benchmark peers share: request validation, the answer a stream emits, and the token
// schedule. Plain Node (no dependencies), required by the Express peer and the Pushpin origin.
//
// The schedule follows tokenfan's mock generator: the first token after `ttft_ms`, then one every
// `inter_token_ms` (± `jitter_ms`), each deadline counted from the stream's start so a late timer
// does not push every later token back. `emitted_at_unix_nanos` is the wall clock when the timer
// actually fired (not the deadline), exactly as the generator stamps its tokens.
//
// The answer is not the generator's BPE corpus: token texts come from a fixed word list (some
// multi-byte: CJK, emoji, like the corpus), and its length is drawn from the seed, uniform over
// 110..450 tokens, the range the mock generator's answers span (mean about 280). A stream emits
// min(length, max_tokens) tokens and ends `length` when max_tokens cut it, else `stop`.

const crypto = require('node:crypto');
const { performance } = require('node:perf_hooks');

const LIMITS = {
  maxTokensCap: 4096,
  defaultMaxTokens: 256,
  maxTtftMs: 30000,
  maxInterTokenMs: 5000,
  maxJitterMs: 1000,
  defaultTtftMs: 300,
  defaultInterTokenMs: 20,
  defaultJitterMs: 5,
};

const ANSWER_MIN = 110;
const ANSWER_MAX = 450;

const WORDS = [
  '##', ' Why', ' streaming', ' matters', ' 🚀', '\n\n', '-', ' **', 'Time', ' to', ' first',
  ' token', '**', ' is', ' what', ' users', ' feel', '.', ' The', ' model', ' writes', ' one',
  ' piece', ' at', ' a', ' time', ',', ' and', ' each', ' should', ' reach', ' the', ' browser',
  ' as', ' soon', ' it', ' exists', '\n', '```', 'rust', ' fn', ' main', '()', ' {', ' }',
  ' let', ' x', ' =', ' 42', ';', ' 流', '式', '传输', '很', '重要', '。', ' 日本語', ' も',
  ' ✨', ' 👍', ' resume', ' from', ' seq', ' without', ' gaps', ' or', ' duplicates',
];

const ALLOWED_ROLES = new Set(['system', 'developer', 'user', 'assistant', 'tool']);
const REQUEST_KEYS = new Set(['messages', 'prompt', 'max_tokens', 'seed', 'timing', 'model', 'emit_times']);
const TIMING_KEYS = new Set(['ttft_ms', 'inter_token_ms', 'jitter_ms']);

/** A 400 with tokenfan's error shape. */
class RequestError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  body() {
    return { error: { code: this.code, message: this.message } };
  }
}

function invalid(message) {
  return new RequestError(400, 'invalid_request', message);
}

function isUint(v, max) {
  return Number.isInteger(v) && v >= 0 && v <= max;
}

/** Checks a `POST /v1/streams` body (already parsed JSON) and returns the stream spec. */
function parseRequest(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw invalid('the body must be a JSON object');
  }
  for (const key of Object.keys(body)) {
    if (!REQUEST_KEYS.has(key)) throw invalid(`${key}: unknown field \`${key}\``);
  }
  let messages;
  if (body.messages !== undefined && body.prompt !== undefined) {
    throw invalid('prompt: give either `messages` or `prompt`, not both');
  } else if (body.prompt !== undefined) {
    if (typeof body.prompt !== 'string') throw invalid('prompt: expected a string');
    messages = [{ role: 'user', content: body.prompt }];
  } else if (body.messages !== undefined) {
    if (!Array.isArray(body.messages) || body.messages.length === 0) {
      throw invalid('messages: at least one message is required');
    }
    messages = body.messages.map((m, i) => {
      if (m === null || typeof m !== 'object' || typeof m.content !== 'string' || !ALLOWED_ROLES.has(m.role)) {
        throw invalid(`messages[${i}]: expected {"role": one of ${[...ALLOWED_ROLES].join(', ')}, "content": string}`);
      }
      return { role: m.role, content: m.content };
    });
  } else {
    throw invalid('messages: `messages` (or `prompt`) is required');
  }
  let maxTokens = LIMITS.defaultMaxTokens;
  if (body.max_tokens !== undefined) {
    if (!Number.isInteger(body.max_tokens) || body.max_tokens < 1 || body.max_tokens > LIMITS.maxTokensCap) {
      throw invalid(`max_tokens: ${JSON.stringify(body.max_tokens)} is out of range 1..=${LIMITS.maxTokensCap}`);
    }
    maxTokens = body.max_tokens;
  }
  let seed;
  if (body.seed !== undefined) {
    if (!Number.isInteger(body.seed) || body.seed < 0) throw invalid('seed: expected an unsigned integer');
    seed = body.seed;
  } else {
    seed = crypto.randomInt(0, 2 ** 47);
  }
  const timing = {
    ttftMs: LIMITS.defaultTtftMs,
    interTokenMs: LIMITS.defaultInterTokenMs,
    jitterMs: LIMITS.defaultJitterMs,
  };
  if (body.timing !== undefined) {
    const t = body.timing;
    if (t === null || typeof t !== 'object' || Array.isArray(t)) throw invalid('timing: expected an object');
    for (const key of Object.keys(t)) {
      if (!TIMING_KEYS.has(key)) throw invalid(`timing.${key}: unknown field \`${key}\``);
    }
    const bound = (name, max) => {
      if (t[name] === undefined) return undefined;
      if (!isUint(t[name], max)) throw invalid(`timing.${name}: ${JSON.stringify(t[name])} exceeds the server bound ${max}`);
      return t[name];
    };
    timing.ttftMs = bound('ttft_ms', LIMITS.maxTtftMs) ?? timing.ttftMs;
    timing.interTokenMs = bound('inter_token_ms', LIMITS.maxInterTokenMs) ?? timing.interTokenMs;
    timing.jitterMs = bound('jitter_ms', LIMITS.maxJitterMs) ?? timing.jitterMs;
  }
  if (body.model !== undefined && typeof body.model !== 'string') throw invalid('model: expected a string');
  if (body.emit_times !== undefined && typeof body.emit_times !== 'boolean') {
    throw invalid('emit_times: expected a boolean');
  }
  const promptTokens = messages.reduce((n, m) => n + 3 + m.content.split(/\s+/).filter(Boolean).length, 0);
  return { messages, maxTokens, seed, timing, emitTimes: body.emit_times === true, promptTokens };
}

/** 64-bit FNV-1a over the messages and seed, folded into a 32-bit state for the word picker. */
function seedState(spec) {
  let h = 0xcbf29ce484222325n;
  const feed = (s) => {
    for (const b of Buffer.from(s)) {
      h ^= BigInt(b);
      h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
    }
  };
  for (const m of spec.messages) {
    feed(m.role);
    feed(m.content);
  }
  feed(String(spec.seed));
  return Number(h & 0xffffffffn) ^ Number(h >> 32n) || 1;
}

/** xorshift32: deterministic per stream, cheap per token. */
function nextRandom(state) {
  let x = state.x;
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  state.x = x >>> 0;
  return state.x;
}

function newStreamId() {
  return crypto.randomBytes(16).toString('base64url');
}

// Wall clock with sub-millisecond precision. performance.timeOrigin + performance.now() has it,
// but on Node 20 it runs a fraction of a millisecond off the system's wall clock (0.6 ms ahead on
// the benchmark machine), which the loadgen would read as negative delays. Date.now() is the
// wall clock, truncated to whole milliseconds, so `Date.now() - (timeOrigin + now())` read in
// that order is a lower bound of the true offset, within a millisecond of it; the largest such
// bound seen converges on the offset. Every reading adds a sample; the maximum is kept over the
// current and the previous 10 s window, so a slow drift of the wall clock is followed.
const OFFSET_WINDOW_MS = 10000;
let offsetWindowStart = performance.now();
let offsetMax = -Infinity;
let offsetPrevMax = -Infinity;

function sampleOffset() {
  const wall = Date.now();
  const precise = performance.timeOrigin + performance.now();
  const now = precise - performance.timeOrigin;
  if (now - offsetWindowStart > OFFSET_WINDOW_MS) {
    offsetPrevMax = offsetMax;
    offsetMax = -Infinity;
    offsetWindowStart = now;
  }
  offsetMax = Math.max(offsetMax, wall - precise);
  return precise;
}

// Calibrate at start-up: read across a few millisecond edges of Date.now() (about 3 ms of work).
for (let edges = 0, last = Date.now(); edges < 3; ) {
  sampleOffset();
  const d = Date.now();
  if (d !== last) {
    edges += 1;
    last = d;
  }
}

function unixNanosNow() {
  const precise = sampleOffset();
  return Math.round((precise + Math.max(offsetMax, offsetPrevMax)) * 1e6);
}

/**
 * Runs one stream's schedule with a single timer. `onEvent(event)` receives each native event
 * object in order (tokens, then exactly one `done`). Returns a handle whose `cancel()` ends the
 * stream at once with `finish_reason: "cancelled"`.
 */
function runSchedule(spec, onEvent) {
  const rng = { x: seedState(spec) };
  const length = ANSWER_MIN + (nextRandom(rng) % (ANSWER_MAX - ANSWER_MIN + 1));
  const end = Math.min(length, spec.maxTokens);
  const finish = end < length ? 'length' : 'stop';
  const start = performance.now();
  let index = 0;
  let timer = null;
  let finished = false;

  const deadline = (i) => {
    let d = start + spec.timing.ttftMs + i * spec.timing.interTokenMs;
    if (spec.timing.jitterMs > 0) {
      d += (nextRandom(rng) % (2 * spec.timing.jitterMs + 1)) - spec.timing.jitterMs;
    }
    return d;
  };
  const finishWith = (reason) => {
    finished = true;
    timer = null;
    onEvent({
      type: 'done',
      seq: index + 1,
      finish_reason: reason,
      usage: { prompt_tokens: reason === 'cancelled' ? 0 : spec.promptTokens, completion_tokens: index },
    });
  };
  const tick = () => {
    const event = { type: 'token', seq: index + 1, text: WORDS[nextRandom(rng) % WORDS.length] };
    if (spec.emitTimes) event.emitted_at_unix_nanos = unixNanosNow();
    index += 1;
    onEvent(event);
    if (finished) return; // cancelled from inside onEvent
    if (index >= end) {
      finishWith(finish);
      return;
    }
    timer = setTimeout(tick, Math.max(0, deadline(index) - performance.now()));
  };
  timer = setTimeout(tick, Math.max(0, deadline(0) - performance.now()));
  return {
    cancel() {
      if (finished) return false;
      if (timer) clearTimeout(timer);
      finishWith('cancelled');
      return true;
    },
  };
}

module.exports = { LIMITS, RequestError, parseRequest, runSchedule, newStreamId, unixNanosNow };
