// Test support: an in-memory WebSocket whose server side the test scripts frame by frame.
// (node --test also runs this file; it defines no tests.)

const json = (value) => JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v));

/**
 * Hands out connections: every `new WebSocket()` of the client becomes a `Peer` the test
 * takes with `await net.accept()`. `net.WebSocket` is the class to pass as `options.WebSocket`.
 */
export class FakeNet {
  #peers = [];
  #waiters = [];
  /**
   * When set, new sockets fail to open: `true` with `error` then `close` (like browsers),
   * `'error-only'` with an `error` event and no `close` (like Node 20's WebSocket).
   */
  refuse = false;
  opened = 0;

  constructor() {
    const net = this;
    this.WebSocket = class extends FakeWebSocket {
      constructor(url, protocol) {
        super(url, protocol);
        net.#connect(this);
      }
    };
  }

  #connect(ws) {
    this.opened += 1;
    if (this.refuse) {
      const errorOnly = this.refuse === 'error-only';
      setTimeout(() => {
        ws.dispatch('error', {});
        if (!errorOnly) ws.fireClose(1006, 'refused');
      }, 0);
      return;
    }
    const peer = new Peer(ws);
    setTimeout(() => {
      ws.readyState = 1;
      ws.dispatch('open', {});
    }, 0);
    const waiter = this.#waiters.shift();
    if (waiter) waiter(peer);
    else this.#peers.push(peer);
  }

  /** The next connection the client opens. */
  accept() {
    const peer = this.#peers.shift();
    if (peer) return Promise.resolve(peer);
    return new Promise((resolve) => this.#waiters.push(resolve));
  }
}

class FakeWebSocket {
  readyState = 0;
  #listeners = new Map();

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.sent = [];
    this.onSent = null;
  }

  addEventListener(type, fn, options = {}) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, []);
    this.#listeners.get(type).push({ fn, once: Boolean(options.once) });
  }

  dispatch(type, event) {
    const listeners = this.#listeners.get(type) ?? [];
    this.#listeners.set(type, listeners.filter((l) => !l.once));
    for (const { fn } of listeners) fn(event);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('not open');
    this.sent.push(text);
    this.onSent?.(text);
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    setTimeout(() => this.fireClose(code, reason), 0);
  }

  fireClose(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.dispatch('close', { code, reason });
  }
}

/** The broker's end of one fake connection. */
export class Peer {
  #ws;
  #frames = [];
  #waiters = [];
  closedByClient = false;

  constructor(ws) {
    this.#ws = ws;
    ws.onSent = (text) => {
      const frame = JSON.parse(text);
      const waiter = this.#waiters.shift();
      if (waiter) waiter(frame);
      else this.#frames.push(frame);
    };
    ws.addEventListener('close', () => {
      this.closedByClient = true;
    });
  }

  get url() {
    return this.#ws.url;
  }

  get protocol() {
    return this.#ws.protocol;
  }

  get open() {
    return this.#ws.readyState === 1;
  }

  /** The next frame the client sent, whatever it is. */
  recvRaw(ms = 3000) {
    const frame = this.#frames.shift();
    if (frame) return Promise.resolve(frame);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error('no frame from the client'));
      }, ms);
      const waiter = (f) => {
        clearTimeout(timer);
        resolve(f);
      };
      this.#waiters.push(waiter);
    });
  }

  /** The next frame that is not a heartbeat Ping (pings are answered). */
  async recv(ms) {
    for (;;) {
      const frame = await this.recvRaw(ms);
      if (frame.ping) {
        this.reply(frame.requestId, 'pong', { serverTimeMs: '1' });
        continue;
      }
      return frame;
    }
  }

  /** Frames already received and not yet taken. */
  pending() {
    return this.#frames.splice(0);
  }

  reply(requestId, kind, body) {
    const frame = requestId === undefined || requestId === '0' ? { [kind]: body } : { requestId, [kind]: body };
    this.#ws.dispatch('message', { data: json(frame) });
  }

  push(kind, body) {
    this.reply(undefined, kind, body);
  }

  raw(text) {
    this.#ws.dispatch('message', { data: text });
  }

  /** The broker closes the connection. */
  close() {
    this.#ws.fireClose(1000, '');
  }

  /** Reads the Hello and answers a Welcome; returns the Hello frame. */
  async accept(welcomeFields = {}) {
    const frame = await this.recv();
    if (!frame.hello) throw new Error(`expected Hello, got ${JSON.stringify(frame)}`);
    this.reply(frame.requestId, 'welcome', welcome(welcomeFields));
    return frame;
  }
}

/** A Welcome like the broker's, with a resumed page (empty unless given). */
export function welcome(fields = {}) {
  return {
    userId: 'alice',
    sessionId: 's1',
    heartbeatIntervalMs: 15000,
    idleTimeoutMs: 30000,
    limits: { maxFrameBytes: 1048576, maxInflight: 256, maxPresenceUsers: 500 },
    capabilities: ['direct', 'groups', 'history', 'sync', 'idempotent-send', 'membership-feed',
      'multi-device', 'receipts', 'typing', 'presence', 'rate-limits'],
    resumed: {},
    protocolVersion: 1,
    ...fields,
  };
}

/** A wire Message. */
export function wireMessage(conversationId, seq, text = `m${seq}`, sender = 'bob') {
  return {
    conversationId, seq: String(seq), sender, timestampMs: String(1000 + seq),
    clientMsgId: `k${seq}`, content: { text },
  };
}
