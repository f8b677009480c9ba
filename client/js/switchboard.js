// switchboard.js: the browser (and Node 20) client of the Switchboard chat broker.
//
// One ES module, no dependencies. It speaks the WebSocket subprotocol `switchboard.v1.json`
// (one JSON ClientFrame/ServerFrame per text message, canonical protobuf JSON mapping) and
// follows docs/protocol.md and the Rust reference client (client/src):
//
// - replies are matched to requests by request id; pushes become events;
// - every conversation's log is delivered in seq order, each entry exactly once, by the client
//   rule (section 16, `SyncState` below), including the user's own sends (built from the acks);
// - Ping every `heartbeatIntervalMs`; a silent connection is considered dead;
// - reconnect with full-jitter exponential backoff, resume from the current position, finish
//   the sync pass, then re-send unanswered sends with their original `clientMsgId`;
// - automatic delivery receipts (at most one MarkDelivered per conversation per 500 ms);
// - presence subscriptions renewed after every reconnect.
//
// The contract is client/js/API.md; the TypeScript declarations are switchboard.d.ts.

const PROTOCOL_VERSION = 1;
const SUBPROTOCOL = 'switchboard.v1.json';
const CLIENT_NAME = 'switchboard-js/0.1';

const DEFAULT_HEARTBEAT_MS = 15_000;
const DEFAULT_IDLE_TIMEOUT_MS = 30_000;
const DEFAULT_MAX_PRESENCE_USERS = 500;
/** The largest frame the broker may be configured with (section 3). */
const MAX_FRAME_BYTES = 16 * 1024 * 1024;
/** The least wait before retrying a failed sync request. */
const SYNC_RETRY_MS = 1_000;
/** The least wait before retrying a rate-limited send. */
const MIN_SEND_RETRY_MS = 50;
/** Per conversation, at most one automatic MarkDelivered per this many ms. */
const DELIVERY_WINDOW_MS = 500;
/** Bound of each reordering buffer. */
const DEFAULT_BUFFER_LIMIT = 1024;

const DEFAULT_OPTIONS = Object.freeze({
  reconnect: { baseMs: 200, capMs: 30_000 },
  autoDeliveryReceipts: true,
  sendRateLimitRetries: 3,
  connectTimeoutMs: 10_000,
  clientName: CLIENT_NAME,
});

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/**
 * A failed request or connection attempt. `code` is the broker's `ErrorCode` name
 * (`ERROR_CODE_NOT_FOUND`, …) or one of the client's own codes: `CONNECTION_LOST`, `CLOSED`,
 * `TIMEOUT`, `CONNECT_FAILED`, `TOKEN_PROVIDER`, `FRAME_TOO_LARGE`, `PROTOCOL`.
 */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {number} [retryAfterMs]
   * @param {string} [reason] the broker's machine-readable `Error.reason` (e.g. `expired`)
   */
  constructor(code, message, retryAfterMs = 0, reason = '') {
    super(message || code);
    this.name = 'SwitchboardError';
    this.code = code;
    this.retryAfterMs = retryAfterMs;
    this.reason = reason;
  }

  /** @param {{code: string, message: string, retryAfterMs: bigint, reason: string}} e a decoded `Error` frame */
  static fromWire(e) {
    return new SwitchboardError(e.code, e.message, Number(e.retryAfterMs), e.reason ?? '');
  }
}

const connectionLost = () => new SwitchboardError('CONNECTION_LOST', 'connection lost');
const clientClosed = () => new SwitchboardError('CLOSED', 'client closed');
const protocolError = (what) => new SwitchboardError('PROTOCOL', `protocol violation: ${what}`);

// ---------------------------------------------------------------------------------------------
// Wire format: canonical protobuf JSON with 64-bit integers as BigInt on our side
// ---------------------------------------------------------------------------------------------

const ENUMS = {
  ErrorCode: ['ERROR_CODE_', ['UNSPECIFIED', 'BAD_REQUEST', 'UNAUTHENTICATED', 'FORBIDDEN',
    'NOT_FOUND', 'UNSUPPORTED', 'RATE_LIMITED', 'UNAVAILABLE', 'NOT_LEADER', 'TOO_LARGE',
    'PROTOCOL_VERSION', 'ALREADY_EXISTS', 'LIMIT_EXCEEDED', 'INTERNAL', 'TOKEN_EXPIRED',
    'STORAGE_FULL']],
  DisconnectReason: ['DISCONNECT_REASON_', ['UNSPECIFIED', 'SHUTDOWN', 'SLOW_CONSUMER',
    'PROTOCOL_ERROR', 'AUTH_FAILED', 'HELLO_TIMEOUT', 'IDLE_TIMEOUT', 'FRAME_TOO_LARGE',
    'SERVER_ERROR', 'RATE_LIMITED', 'CONNECTION_LIMIT', 'TOKEN_EXPIRED', 'CLOSED_BY_ADMIN']],
  FeedEventKind: ['FEED_EVENT_KIND_', ['UNSPECIFIED', 'ADDED', 'REMOVED']],
  ConversationKind: ['CONVERSATION_KIND_', ['UNSPECIFIED', 'DIRECT', 'GROUP']],
  HistoryVisibility: ['HISTORY_VISIBILITY_', ['UNSPECIFIED', 'SHARED', 'JOINED']],
  Role: ['ROLE_', ['UNSPECIFIED', 'MEMBER', 'ADMIN']],
};
const ENUM_NAMES = Object.fromEntries(
  Object.entries(ENUMS).map(([name, [prefix, values]]) => [name, values.map((v) => prefix + v)]),
);

// Field types of the messages the broker sends. Scalars and enums get their default value when
// absent; `opt` fields (nested messages, oneof cases) stay undefined when absent.
const U64 = 'u64';
const U32 = 'u32';
const STR = 'str';
const BOOL = 'bool';
const OPAQUE = 'opaque'; // bytes kept as their base64 text (continuation tokens)
const BYTES = 'bytes'; // bytes decoded to a Uint8Array
const list = (of) => ({ list: of });
const msg = (name) => ({ msg: name });
const enm = (name) => ({ enm: name });
const opt = (type) => ({ opt: type });

const SCHEMA = {
  Welcome: { userId: STR, sessionId: STR, serverTimeMs: U64, heartbeatIntervalMs: U32,
    idleTimeoutMs: U32, limits: opt(msg('Limits')), capabilities: list(STR),
    feedPosition: U64, resumed: opt(msg('SyncPage')), protocolVersion: U32,
    tokenExpiresAtMs: U64 },
  Limits: { maxFrameBytes: U32, maxBodyBytes: U32, maxHistoryLimit: U32, maxSyncLimit: U32,
    maxInflight: U32, maxGroupMembers: U32, maxMembersPerRequest: U32, maxIdBytes: U32,
    maxConversationIdBytes: U32, maxPresenceUsers: U32, maxPresenceSubscriptions: U32,
    sendRatePerSec: U32, sendBurst: U32 },
  Ack: {},
  RefreshTokenOk: { expiresAtMs: U64 },
  Pong: { serverTimeMs: U64 },
  Error: { code: enm('ErrorCode'), message: STR, retryAfterMs: U64, leaderHint: STR,
    reason: STR },
  Disconnect: { reason: enm('DisconnectReason'), message: STR, retryAfterMs: U64 },
  Content: { contentType: STR, text: opt(STR), data: opt(BYTES) },
  SendAck: { conversationId: STR, seq: U64, timestampMs: U64, clientMsgId: STR,
    duplicate: BOOL },
  Message: { conversationId: STR, seq: U64, sender: STR, timestampMs: U64, clientMsgId: STR,
    content: opt(msg('Content')), system: opt(msg('SystemEvent')) },
  SystemEvent: { created: opt(msg('ConversationCreated')),
    membersAdded: opt(msg('MembersAdded')), membersRemoved: opt(msg('MembersRemoved')),
    memberLeft: opt(msg('MemberLeft')) },
  ConversationCreated: { kind: enm('ConversationKind'), name: STR, members: list(STR),
    visibility: enm('HistoryVisibility') },
  MembersAdded: { users: list(STR) },
  MembersRemoved: { users: list(STR) },
  MemberLeft: { user: STR },
  HistoryPage: { conversationId: STR, messages: list(msg('Message')), hasMore: BOOL,
    firstSeq: U64, lastSeq: U64 },
  SyncPage: { feedEvents: list(msg('FeedEvent')), messages: list(msg('Message')),
    resets: list(msg('CursorReset')), revoked: list(STR), feedPosition: U64,
    continuation: OPAQUE, hasMore: BOOL },
  CursorReset: { conversationId: STR, firstSeq: U64, lastSeq: U64 },
  FeedEvent: { userSeq: U64, kind: enm('FeedEventKind'), conversationId: STR,
    conversationSeq: U64, actor: STR, timestampMs: U64,
    conversationKind: enm('ConversationKind'), conversationName: STR },
  Conversation: { conversationId: STR, kind: enm('ConversationKind'), name: STR,
    visibility: enm('HistoryVisibility'), createdAtMs: U64, createdBy: STR, created: BOOL,
    lastSeq: U64, memberCount: U32 },
  MembershipResult: { conversationId: STR, seq: U64, changed: list(STR) },
  ConversationList: { conversations: list(msg('ConversationSummary')), hasMore: BOOL,
    nextAfter: STR },
  ConversationSummary: { conversationId: STR, kind: enm('ConversationKind'), name: STR,
    visibility: enm('HistoryVisibility'), role: enm('Role'), lastSeq: U64, readSeq: U64,
    unreadCount: U64, firstSeq: U64, lastActivityMs: U64, memberCount: U32 },
  MemberList: { conversationId: STR, members: list(msg('Member')), hasMore: BOOL,
    nextAfter: STR },
  Member: { userId: STR, role: enm('Role'), joinedSeq: U64 },
  Receipt: { conversationId: STR, userId: STR, deliveredSeq: U64, readSeq: U64 },
  ReceiptList: { conversationId: STR, receipts: list(msg('Receipt')), hasMore: BOOL,
    nextAfter: STR },
  PresenceList: { presences: list(msg('Presence')) },
  Presence: { userId: STR, online: BOOL, devices: U32, lastSeenMs: U64 },
  TypingEvent: { conversationId: STR, userId: STR, active: BOOL, expiresInMs: U32 },
};

/** The `ServerFrame` oneof cases and their message types. */
const SERVER_KINDS = {
  welcome: 'Welcome', pong: 'Pong', error: 'Error', disconnect: 'Disconnect',
  sendAck: 'SendAck', history: 'HistoryPage', sync: 'SyncPage', conversation: 'Conversation',
  membership: 'MembershipResult', conversations: 'ConversationList', members: 'MemberList',
  receipt: 'Receipt', presences: 'PresenceList', receipts: 'ReceiptList', ack: 'Ack',
  refreshTokenOk: 'RefreshTokenOk', message: 'Message', feedEvent: 'FeedEvent', presence: 'Presence', typing: 'TypingEvent',
  receiptEvent: 'Receipt',
};

/** The reply each request kind expects (`null`: any, checked by the caller). */
const EXPECTED_REPLY = {
  ping: 'pong', history: 'history', createConversation: 'conversation',
  addMembers: 'membership', removeMembers: 'membership', leave: 'membership',
  listConversations: 'conversations', listMembers: 'members', markRead: 'receipt',
  markDelivered: 'receipt', getReceipts: 'receipts', presenceQuery: 'presences',
  presenceSubscribe: 'presences', typing: 'ack', presenceUnsubscribe: 'ack',
  refreshToken: 'refreshTokenOk',
};

/** A 64-bit value (bigint, number or decimal string) as a BigInt. */
function toU64(value, what = 'value') {
  if (typeof value === 'bigint' && value >= 0n) return value;
  if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
  if (typeof value === 'string' && /^\d+$/.test(value)) return BigInt(value);
  throw new TypeError(`${what} must be a non-negative integer, got ${String(value)}`);
}

function decodeEnum(name, value) {
  const names = ENUM_NAMES[name];
  if (typeof value === 'number') return names[value] ?? names[0];
  return names.includes(value) ? value : names[0];
}

function decodeField(type, value) {
  if (typeof type === 'object' && 'opt' in type) {
    return value === undefined || value === null ? undefined : decodeField(type.opt, value);
  }
  if (typeof type === 'object') {
    if ('list' in type) return (value ?? []).map((v) => decodeField(type.list, v));
    if ('msg' in type) return decodeMessage(type.msg, value ?? {});
    return decodeEnum(type.enm, value);
  }
  switch (type) {
    case U64: return value === undefined ? 0n : toU64(value);
    case U32: return Number(value ?? 0);
    case STR: return value ?? '';
    case BOOL: return value ?? false;
    case OPAQUE: return value ?? '';
    case BYTES: return base64ToBytes(value ?? '');
    default: throw new Error(`unknown field type ${type}`);
  }
}

/** A decoded message: known fields normalised (defaults filled in), unknown ones kept. */
function decodeMessage(name, raw) {
  const out = { ...raw };
  for (const [field, type] of Object.entries(SCHEMA[name])) {
    const value = decodeField(type, raw[field]);
    if (value === undefined) delete out[field];
    else out[field] = value;
  }
  return out;
}

/**
 * Parses one ServerFrame text. `kind` is the oneof case (`null` for a case this client does
 * not know), `requestId` a decimal string ('0' for pushes).
 */
function decodeFrame(text) {
  const raw = JSON.parse(text);
  if (raw === null || typeof raw !== 'object') throw new TypeError('a frame must be an object');
  const requestId = String(raw.requestId ?? '0');
  const kind = Object.keys(raw).find((k) => Object.hasOwn(SERVER_KINDS, k)) ?? null;
  const body = kind === null ? null : decodeMessage(SERVER_KINDS[kind], raw[kind] ?? {});
  return { requestId, kind, body };
}

/** The JSON text of a ClientFrame; BigInts become decimal strings, Uint8Arrays base64. */
function encodeFrame(requestId, kind, body) {
  return JSON.stringify({ requestId, [kind]: body }, (_key, value) => {
    if (typeof value === 'bigint') return value.toString();
    if (value instanceof Uint8Array) return bytesToBase64(value);
    return value;
  });
}

function bytesToBase64(bytes) {
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function base64ToBytes(text) {
  const binary = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

const utf8 = new TextEncoder();

/** UTF-8 length of a string, cheaply when it is clearly small enough. */
function byteLength(text, limit) {
  return text.length * 3 <= limit ? text.length : utf8.encode(text).length;
}

// ---------------------------------------------------------------------------------------------
// The client rule (docs/protocol.md section 16), sans I/O
// ---------------------------------------------------------------------------------------------

const APPLIED = 'applied';
const DUPLICATE = 'duplicate';
const BUFFERED = 'buffered';

/** Puts `item` at `key` in a bounded reordering buffer (cleared on overflow: a sync refetches). */
function bufferPut(buffer, key, item, limit) {
  if (buffer.size >= limit && !buffer.has(key)) buffer.clear();
  buffer.set(key, item);
}

/** Applies buffered items that follow `seq.cursor` without a gap; drops those at or below it. */
function release(seq, emit) {
  for (let next = seq.cursor + 1n; seq.buffer.has(next); next = seq.cursor + 1n) {
    const item = seq.buffer.get(next);
    seq.buffer.delete(next);
    emit(item);
    seq.cursor = next;
  }
  for (const key of seq.buffer.keys()) {
    if (key <= seq.cursor) seq.buffer.delete(key);
  }
}

/** Offers item `key` to a sequence `{cursor, buffer}` (R1–R3); applied items go to `emit`. */
function offer(seq, key, item, limit, emit) {
  if (key <= seq.cursor) return DUPLICATE;
  if (key === seq.cursor + 1n) {
    emit(item);
    seq.cursor = key;
    release(seq, emit);
    return APPLIED;
  }
  bufferPut(seq.buffer, key, item, limit);
  return BUFFERED;
}

/** A position as given by the application, normalised to `{feedPosition, cursors: Map}`. */
function normalizePosition(position) {
  const cursors = new Map();
  const given = position?.cursors;
  const entries = given instanceof Map ? given.entries()
    : Array.isArray(given) ? given.map((c) => [c.conversationId, c.seq])
      : Object.entries(given ?? {});
  for (const [conversationId, seq] of entries) {
    cursors.set(conversationId, toU64(seq, `cursor of ${conversationId}`));
  }
  return { feedPosition: toU64(position?.feedPosition ?? 0n, 'feedPosition'), cursors };
}

const pred = (seq) => (seq > 0n ? seq - 1n : 0n);

/**
 * Per-conversation cursors, reordering buffers and the sync need: the client rule of
 * docs/protocol.md section 16, mirroring client/src/state.rs. Methods return the events to
 * emit, in order: `{type: 'message' | 'feed' | 'reset' | 'revoked', data}`.
 */
export class SyncState {
  #feed; // {cursor: bigint (the feed position), buffer: Map<userSeq, FeedEvent>}
  #convs = new Map(); // id -> {cursor: bigint | null, buffer: Map<seq, Message>}
  #needSync = false;
  #bufferLimit;

  /**
   * @param {object} [position] `{feedPosition, cursors}` (cursors: Map, object or Cursor[])
   * @param {number} [bufferLimit] bound of each reordering buffer
   */
  constructor(position, bufferLimit = DEFAULT_BUFFER_LIMIT) {
    const { feedPosition, cursors } = normalizePosition(position);
    this.#feed = { cursor: feedPosition, buffer: new Map() };
    for (const [id, seq] of cursors) this.#convs.set(id, { cursor: seq, buffer: new Map() });
    this.#bufferLimit = bufferLimit;
  }

  /** The position: feed position and every cursor, ordered by conversation id. */
  get position() {
    const cursors = [...this.#convs]
      .filter(([, conv]) => conv.cursor !== null)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([id, conv]) => [id, conv.cursor]);
    return { feedPosition: this.#feed.cursor, cursors: new Map(cursors) };
  }

  /** The position in its wire form (`SyncPosition`). */
  wirePosition() {
    const { feedPosition, cursors } = this.position;
    return {
      feedPosition,
      cursors: [...cursors].map(([conversationId, seq]) => ({ conversationId, seq })),
    };
  }

  /** True when something was missed and a sync pass should run. */
  get needsSync() {
    return this.#needSync;
  }

  /** Requests a sync pass. */
  requestSync() {
    this.#needSync = true;
  }

  /** A pass starts: needs raised from now on ask for another pass after it (R11). */
  beginPass() {
    this.#needSync = false;
  }

  /** A pass completed: buffers of conversations that still have no cursor are dropped. */
  endPass() {
    for (const [id, conv] of this.#convs) {
      if (conv.cursor === null) this.#convs.delete(id);
    }
  }

  /** The broker reported entry `seq` of a conversation (R10): sync unless already applied. */
  expectSeq(conversationId, seq) {
    const cursor = this.#convs.get(conversationId)?.cursor ?? null;
    if (cursor === null || cursor < seq) this.#needSync = true;
  }

  /** Applies a live Message push. */
  applyMessage(message) {
    const out = [];
    this.#offerMessage(message, out);
    return out;
  }

  /**
   * Applies a live FeedEvent push. A live ADDED always asks for a sync, even as a duplicate:
   * a sync made before the live subscription may have missed entries (state.rs).
   */
  applyFeedEvent(event) {
    const out = [];
    if (event.kind === 'FEED_EVENT_KIND_ADDED') this.#needSync = true;
    this.#offerFeed(event, out);
    return out;
  }

  /**
   * Applies the ack of an own send as the message it created (R5). A duplicate ack is never
   * turned into a message: a sync fetches the stored entry if it was not applied yet.
   */
  applyOwnAck(sender, send, ack) {
    if (ack.duplicate) {
      this.expectSeq(send.conversationId, ack.seq);
      return [];
    }
    return this.applyMessage({
      conversationId: send.conversationId,
      seq: ack.seq,
      sender,
      timestampMs: ack.timestampMs,
      clientMsgId: send.clientMsgId,
      content: send.content,
    });
  }

  /**
   * Applies one SyncPage (also Welcome.resumed), R9. Returns the events and, when the page has
   * more, the continuation for the next Sync of the pass (else `null`).
   */
  applyPage(page) {
    const out = [];
    for (const event of page.feedEvents) this.#offerFeed(event, out);
    if (page.feedPosition > this.#feed.cursor) {
      this.#feed.cursor = page.feedPosition;
      this.#releaseFeed(out);
    }
    for (const reset of page.resets) this.#applyReset(reset, out);
    for (const conversationId of page.revoked) {
      this.#convs.delete(conversationId);
      out.push({ type: 'revoked', data: { conversationId } });
    }
    for (const message of page.messages) {
      this.#startCursorFromPage(message);
      this.#offerMessage(message, out);
    }
    return { events: out, continuation: page.hasMore ? page.continuation : null };
  }

  #applyReset({ conversationId, firstSeq, lastSeq }, out) {
    const conv = this.#conv(conversationId);
    conv.buffer.clear();
    conv.cursor = pred(firstSeq);
    this.#needSync = true;
    out.push({ type: 'reset', data: { conversationId, firstSeq, lastSeq } });
  }

  /** R4: the broker sends a cursor-less conversation from its first readable seq. */
  #startCursorFromPage(message) {
    const conv = this.#conv(message.conversationId);
    if (conv.cursor === null) conv.cursor = pred(message.seq);
  }

  #conv(conversationId) {
    let conv = this.#convs.get(conversationId);
    if (!conv) {
      conv = { cursor: null, buffer: new Map() };
      this.#convs.set(conversationId, conv);
    }
    return conv;
  }

  #offerMessage(message, out) {
    const conv = this.#conv(message.conversationId);
    if (conv.cursor === null) {
      bufferPut(conv.buffer, message.seq, message, this.#bufferLimit);
      this.#needSync = true;
      return;
    }
    const emit = (m) => out.push({ type: 'message', data: m });
    if (offer(conv, message.seq, message, this.#bufferLimit, emit) === BUFFERED) {
      this.#needSync = true;
    }
  }

  #offerFeed(event, out) {
    const applied = [];
    const outcome = offer(this.#feed, event.userSeq, event, this.#bufferLimit, (e) => applied.push(e));
    if (outcome === BUFFERED) this.#needSync = true;
    this.#onFeedApplied(applied, out);
  }

  #releaseFeed(out) {
    const applied = [];
    release(this.#feed, (e) => applied.push(e));
    this.#onFeedApplied(applied, out);
  }

  /** R7: ADDED needs a sync; R8: REMOVED drops the cursor and buffer. */
  #onFeedApplied(applied, out) {
    for (const event of applied) {
      if (event.kind === 'FEED_EVENT_KIND_ADDED') this.#needSync = true;
      if (event.kind === 'FEED_EVENT_KIND_REMOVED') this.#convs.delete(event.conversationId);
      out.push({ type: 'feed', data: event });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Automatic delivery receipts, sans I/O (client/src/delivery.rs)
// ---------------------------------------------------------------------------------------------

/**
 * Which MarkDelivered to send, and when: per conversation at most one per window, the first at
 * once, later ones when the window ends with the highest seq emitted by then; never a seq at or
 * below one already sent or confirmed. Times are milliseconds of any monotonic clock.
 */
export class DeliveryTracker {
  #enabled;
  #suspended = false;
  #convs = new Map(); // id -> {emitted, sent, confirmed: bigint, quietUntil: number | null}
  #pending = new Set();
  #windowMs;

  /**
   * @param {boolean} enabled
   * @param {number} [windowMs]
   */
  constructor(enabled, windowMs = DELIVERY_WINDOW_MS) {
    this.#enabled = enabled;
    this.#windowMs = windowMs;
  }

  #conv(conversationId) {
    let conv = this.#convs.get(conversationId);
    if (!conv) {
      conv = { emitted: 0n, sent: 0n, confirmed: 0n, quietUntil: null };
      this.#convs.set(conversationId, conv);
    }
    return conv;
  }

  #track(conversationId, conv) {
    if (conv.emitted > conv.sent) this.#pending.add(conversationId);
    else this.#pending.delete(conversationId);
  }

  /** Message `seq` of a conversation was handed to the application. */
  emitted(conversationId, seq) {
    if (!this.#enabled) return;
    const conv = this.#conv(conversationId);
    if (seq > conv.emitted) conv.emitted = seq;
    this.#track(conversationId, conv);
  }

  /** The broker confirmed the user's delivered watermark in a conversation. */
  confirmed(conversationId, deliveredSeq) {
    if (!this.#enabled) return;
    const conv = this.#conv(conversationId);
    if (deliveredSeq > conv.confirmed) conv.confirmed = deliveredSeq;
    if (deliveredSeq > conv.sent) conv.sent = deliveredSeq;
    this.#track(conversationId, conv);
  }

  /** The conversation's log starts over or the user left it. */
  forget(conversationId) {
    this.#convs.delete(conversationId);
    this.#pending.delete(conversationId);
  }

  /** The broker does not support receipts: send nothing until the next connection. */
  suspend() {
    this.#suspended = true;
  }

  /** The connection ended: what was sent but not confirmed is pending again. */
  connectionLost() {
    this.#suspended = false;
    for (const [id, conv] of this.#convs) {
      conv.sent = conv.confirmed;
      this.#track(id, conv);
    }
  }

  /** The receipts to send at `now`, as `[conversationId, seq]`; each starts a new window. */
  due(now) {
    if (!this.#enabled || this.#suspended) return [];
    const due = [];
    for (const id of this.#pending) {
      const conv = this.#convs.get(id);
      if (conv.quietUntil !== null && conv.quietUntil > now) continue;
      conv.sent = conv.emitted;
      conv.quietUntil = now + this.#windowMs;
      due.push([id, conv.emitted]);
      this.#pending.delete(id);
    }
    return due.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  /** When the next receipt becomes due (`null`: none pending). */
  nextDue() {
    if (!this.#enabled || this.#suspended) return null;
    let next = null;
    for (const id of this.#pending) {
      const at = this.#convs.get(id).quietUntil ?? 0;
      if (next === null || at < next) next = at;
    }
    return next;
  }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const now = () => performance.now();

/** Full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)], at least `floor`. */
export function backoffDelay({ baseMs, capMs }, attempt, floorMs = 0) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 60));
  return Math.max(Math.random() * ceiling, floorMs);
}

/** 32 random hex digits (128 bits), the reference client's `clientMsgId`. */
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** `users` in chunks of at most `max`; none when empty. */
function chunks(users, max) {
  const out = [];
  for (let i = 0; i < users.length; i += max) out.push(users.slice(i, i + max));
  return out;
}

/** The largest JSON message the broker accepts for a frame limit (4/3 of it plus 1 KiB). */
function jsonMessageLimit(maxFrameBytes) {
  const frame = Math.min(maxFrameBytes || MAX_FRAME_BYTES, MAX_FRAME_BYTES);
  return Math.floor(frame / 3) * 4 + 1024;
}

/** Application content (a string or `{contentType?, text?, data?}`) as a `Content`. */
function toContent(content) {
  if (typeof content === 'string') return { contentType: '', text: content };
  if (content === null || typeof content !== 'object') {
    throw new TypeError('content must be a string or {contentType, text | data}');
  }
  const contentType = content.contentType ?? '';
  if (content.data !== undefined) {
    if (!(content.data instanceof Uint8Array)) throw new TypeError('content.data must be a Uint8Array');
    return { contentType, data: content.data };
  }
  return { contentType, text: String(content.text ?? '') };
}

const VISIBILITY = {
  shared: 'HISTORY_VISIBILITY_SHARED',
  joined: 'HISTORY_VISIBILITY_JOINED',
};

function defaultUrl() {
  const location = globalThis.location;
  if (!location?.host) throw new TypeError('options.url is required outside a web page');
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
}

function reportListenerError(error) {
  if (typeof globalThis.reportError === 'function') globalThis.reportError(error);
  else console.error('switchboard: an event listener threw', error);
}

// ---------------------------------------------------------------------------------------------
// Transport: one WebSocket, frames queued until someone takes them
// ---------------------------------------------------------------------------------------------

class Socket {
  #ws;
  #frames = [];
  #waiter = null;
  #opened;
  #failOpen;
  /** Called with each text frame once set; frames before that are queued. */
  onFrame = null;
  /** Called once when the socket closes. */
  onClose = null;
  closed = false;

  constructor(WebSocketImpl, url) {
    this.#ws = new WebSocketImpl(url, SUBPROTOCOL);
    this.#ws.addEventListener('message', (ev) => this.#onMessage(ev.data));
    this.#ws.addEventListener('close', () => this.#onClosed());
    // Some implementations (Node 20's) report a failed connection with `error` and no `close`.
    this.#ws.addEventListener('error', () => this.#onClosed());
    this.#opened = new Promise((resolve, reject) => {
      this.#ws.addEventListener('open', () => resolve());
      this.#failOpen = reject;
    });
    this.#opened.catch(() => {});
  }

  /** Resolves once open; rejects when the socket closes or fails first. */
  opened() {
    return this.#opened;
  }

  /** The next frame, from the queue or when it arrives; rejects when the socket closes. */
  nextFrame() {
    if (this.#frames.length > 0) return Promise.resolve(this.#frames.shift());
    if (this.closed) return Promise.reject(connectionLost());
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  /** Takes every queued frame. */
  drain() {
    return this.#frames.splice(0);
  }

  /** Sends a text frame; false when the socket cannot send any more. */
  send(text) {
    if (this.closed || this.#ws.readyState !== 1) return false;
    try {
      this.#ws.send(text);
      return true;
    } catch {
      return false;
    }
  }

  close(code = 1000, reason = '') {
    this.onFrame = null;
    this.onClose = null;
    try {
      if (this.#ws.readyState < 2) this.#ws.close(code, reason);
    } catch {
      // Already closing.
    }
  }

  #onMessage(data) {
    const text = typeof data === 'string' ? data : null;
    if (this.onFrame) {
      this.onFrame(text);
    } else if (this.#waiter) {
      const { resolve } = this.#waiter;
      this.#waiter = null;
      resolve(text);
    } else {
      this.#frames.push(text);
    }
  }

  #onClosed() {
    if (this.closed) return;
    this.closed = true;
    this.#failOpen(new SwitchboardError('CONNECT_FAILED', `cannot connect to ${this.#ws.url}`));
    if (this.#waiter) {
      const { reject } = this.#waiter;
      this.#waiter = null;
      reject(connectionLost());
    }
    this.onClose?.();
  }
}

/** One authenticated connection and what is in flight on it. */
class Link {
  /** Frames are handled and written only once active (the first link waits one task). */
  active = false;
  /** requestId -> what the reply is for. */
  pending = new Map();
  /** Frames waiting for a free in-flight slot. */
  queue = [];
  lastRead = now();
  pingOutstanding = false;
  /** The resume pass completed: sends and automatic requests may be written. */
  sendsEnabled = false;
  pass = { running: false, continuation: '', waiters: [], resume: true, retryTimer: null };
  heartbeatTimer = null;
  deliveryTimer = null;

  constructor({ socket, welcome, reconnect }) {
    const limits = welcome.limits ?? decodeMessage('Limits', {});
    this.socket = socket;
    this.reconnect = reconnect;
    this.maxInflight = limits.maxInflight;
    this.maxMessageBytes = jsonMessageLimit(limits.maxFrameBytes);
    this.maxPresenceUsers = limits.maxPresenceUsers || DEFAULT_MAX_PRESENCE_USERS;
    this.heartbeatMs = welcome.heartbeatIntervalMs || DEFAULT_HEARTBEAT_MS;
    const idleMs = welcome.idleTimeoutMs || DEFAULT_IDLE_TIMEOUT_MS;
    this.deadAfterMs = Math.max(idleMs, 2 * this.heartbeatMs);
  }

  hasFreeSlot() {
    return this.maxInflight === 0 || this.pending.size < this.maxInflight;
  }

  stopTimers() {
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.deliveryTimer);
    clearTimeout(this.pass.retryTimer);
  }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/**
 * A Switchboard connection that keeps itself alive. Create it with {@link Switchboard.connect}.
 */
export class Switchboard {
  #opts;
  #WebSocket;
  #state;
  #delivery;
  #listeners = new Map();
  #userId = '';
  #sessionId = '';
  #welcome = null;
  #nextId = 1;
  /** Unanswered sends in issue order, kept across reconnects: key -> {send, resolve, reject}. */
  #sends = new Map();
  #nextSend = 0;
  /** `sync()` callers waiting for the next pass to start. */
  #syncWaiters = [];
  /** Users subscribed to for presence, renewed after every reconnect. */
  #presenceSubs = new Set();
  #link = null;
  /** The connection attempt under way, if any: `{socket, abandoned}`. */
  #attempt = null;
  #pumping = false;
  /** close() was called or the client stopped for good. */
  #closed = false;
  /** `closed` was emitted. */
  #finished = false;
  /** Ends the backoff sleep early. */
  #wakeSleep = null;

  /** Use {@link Switchboard.connect}. */
  constructor(options, internal) {
    if (internal !== CONSTRUCT) throw new TypeError('use Switchboard.connect(options)');
    if (!options?.token && !options?.tokenProvider) {
      throw new TypeError('options.token or options.tokenProvider is required');
    }
    const reconnect = options.reconnect === false ? false
      : { ...DEFAULT_OPTIONS.reconnect, ...options.reconnect };
    this.#opts = { ...DEFAULT_OPTIONS, ...options, reconnect, url: options.url ?? defaultUrl() };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    this.#state = new SyncState(options.position);
    this.#delivery = new DeliveryTracker(this.#opts.autoDeliveryReceipts !== false);
  }

  /**
   * Connects and authenticates (one attempt, no retry), then keeps the connection alive:
   * heartbeats, sync, reconnects. Events start in the next task, so listeners registered
   * right after `await Switchboard.connect(…)` see everything, `connected` included.
   * @param {object} options see switchboard.d.ts (`SwitchboardOptions`)
   * @returns {Promise<Switchboard>}
   */
  static async connect(options) {
    const client = new Switchboard(options, CONSTRUCT);
    const position = client.#state.wirePosition();
    const result = await client.#establish(position, client.#takeRequestId(), null);
    if (!result.ok) throw result.error;
    client.#userId = result.session.welcome.userId;
    const link = client.#openLink(result.session, false);
    setTimeout(() => client.#activate(link), 0);
    return client;
  }

  /** The authenticated user's id (from the Welcome). */
  get userId() {
    return this.#userId;
  }

  /** The broker's id of the current (or last) connection. */
  get sessionId() {
    return this.#sessionId;
  }

  /** True while a connection is established. */
  get connected() {
    return this.#link !== null;
  }

  /** `Welcome.capabilities` of the current (or last) connection. */
  get capabilities() {
    return [...(this.#welcome?.capabilities ?? [])];
  }

  /** `Welcome.limits` of the current (or last) connection. */
  get limits() {
    return { ...(this.#welcome?.limits ?? decodeMessage('Limits', {})) };
  }

  /**
   * The position after every event emitted so far: persist it (with the entries) and pass
   * it as `options.position` to continue later.
   * @returns {{feedPosition: bigint, cursors: Map<string, bigint>}}
   */
  get position() {
    return this.#state.position;
  }

  /**
   * Registers a listener.
   * @param {string} type `message`, `feed`, `presence`, `typing`, `receipt`, `reset`,
   *   `revoked`, `connected`, `disconnected` or `closed`
   * @param {Function} fn
   * @returns {this}
   */
  on(type, fn) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(fn);
    return this;
  }

  /**
   * Removes a listener registered with {@link Switchboard#on}.
   * @returns {this}
   */
  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
    return this;
  }

  // --- conversations -------------------------------------------------------------------------

  /**
   * Creates (or returns the existing) direct conversation with `other`.
   * @param {string} other
   * @returns {Promise<object>} Conversation
   */
  async createDirect(other) {
    return this.#request('createConversation', {
      kind: 'CONVERSATION_KIND_DIRECT',
      members: [other],
    });
  }

  /**
   * Creates a group; the caller becomes its admin. With `id` the create is idempotent.
   * @param {string} name
   * @param {string[]} [members] the members besides the caller
   * @param {{visibility?: 'shared' | 'joined', id?: string}} [options]
   * @returns {Promise<object>} Conversation
   */
  async createGroup(name, members = [], { visibility = 'shared', id } = {}) {
    return this.#request('createConversation', {
      kind: 'CONVERSATION_KIND_GROUP',
      name,
      members: [...members],
      visibility: Object.hasOwn(VISIBILITY, visibility) ? VISIBILITY[visibility] : visibility,
      conversationId: id || undefined,
    });
  }

  /**
   * Adds users to a group (admins only).
   * @returns {Promise<object>} MembershipResult
   */
  async addMembers(conversationId, users) {
    return this.#request('addMembers', { conversationId, users: [...users] });
  }

  /**
   * Removes users from a group (admins only).
   * @returns {Promise<object>} MembershipResult
   */
  async removeMembers(conversationId, users) {
    return this.#request('removeMembers', { conversationId, users: [...users] });
  }

  /**
   * Leaves a group.
   * @returns {Promise<object>} MembershipResult
   */
  async leave(conversationId) {
    return this.#request('leave', { conversationId });
  }

  /**
   * One page of the caller's conversations, by id, after `after` (the previous `nextAfter`).
   * @param {{after?: string, limit?: number}} [options]
   * @returns {Promise<object>} ConversationList
   */
  async listConversations({ after, limit } = {}) {
    return this.#request('listConversations', { after: after || undefined, limit });
  }

  /**
   * One page of a conversation's members, by user id.
   * @param {string} conversationId
   * @param {{after?: string, limit?: number}} [options]
   * @returns {Promise<object>} MemberList
   */
  async listMembers(conversationId, { after, limit } = {}) {
    return this.#request('listMembers', { conversationId, after: after || undefined, limit });
  }

  // --- messages ------------------------------------------------------------------------------

  /**
   * Sends a message. Unanswered sends are re-sent with the same `clientMsgId` after a
   * reconnect, and sends issued while disconnected wait for the next connection. A
   * `RATE_LIMITED` send is retried after the broker's `retryAfterMs` (up to
   * `sendRateLimitRetries` times). The message is also emitted as a `message` event, in order.
   * @param {string} conversationId
   * @param {string | {contentType?: string, text?: string, data?: Uint8Array}} content
   * @param {{clientMsgId?: string}} [options] an application-chosen idempotency key
   * @returns {Promise<object>} SendAck
   */
  async send(conversationId, content, { clientMsgId } = {}) {
    const send = { conversationId, clientMsgId: clientMsgId ?? randomKey(), content: toContent(content) };
    let retriesLeft = this.#opts.sendRateLimitRetries;
    for (;;) {
      try {
        return await this.#submitSend(send);
      } catch (error) {
        if (error.code !== 'ERROR_CODE_RATE_LIMITED' || retriesLeft <= 0) throw error;
        retriesLeft -= 1;
        await new Promise((r) => setTimeout(r, Math.max(error.retryAfterMs, MIN_SEND_RETRY_MS)));
      }
    }
  }

  /**
   * One page of a conversation's log; it does not move the cursor.
   * @param {string} conversationId
   * @param {{before?: bigint | number, after?: bigint | number}} [anchor] none: the newest page
   * @param {number} [limit] 0: the broker's maximum
   * @returns {Promise<object>} HistoryPage
   */
  async history(conversationId, anchor = {}, limit = 0) {
    const body = { conversationId, limit: limit || undefined };
    if (anchor.before !== undefined) body.beforeSeq = toU64(anchor.before, 'before');
    else if (anchor.after !== undefined) body.afterSeq = toU64(anchor.after, 'after');
    return this.#request('history', body);
  }

  /**
   * Runs a full sync pass that starts after this call; resolves once it completed and its
   * events were emitted.
   * @returns {Promise<void>}
   */
  sync() {
    if (this.#closed) return Promise.reject(clientClosed());
    const link = this.#link;
    if (!link) return Promise.reject(connectionLost());
    return new Promise((resolve, reject) => {
      this.#syncWaiters.push({ resolve, reject });
      this.#pump(link);
    });
  }

  // --- receipts, typing, presence ------------------------------------------------------------

  /**
   * Marks everything up to `seq` as read by the user (implies delivered).
   * @returns {Promise<object>} Receipt: the user's own watermarks now
   */
  async markRead(conversationId, seq) {
    return this.#request('markRead', { conversationId, seq: toU64(seq, 'seq') });
  }

  /**
   * Every member's watermarks in a conversation, one page.
   * @param {string} conversationId
   * @param {{after?: string, limit?: number}} [options]
   * @returns {Promise<object>} ReceiptList
   */
  async receipts(conversationId, { after, limit } = {}) {
    return this.#request('getReceipts', { conversationId, after: after || undefined, limit });
  }

  /**
   * Tells the conversation's online members that the user started or stopped typing.
   * Never retried (a `RATE_LIMITED` rejection is normal; the next renewal supersedes it).
   * @returns {Promise<void>}
   */
  async typing(conversationId, active) {
    await this.#request('typing', { conversationId, active: Boolean(active) });
  }

  /**
   * The current presence of `users` (split into requests of `maxPresenceUsers`).
   * @param {string[]} users
   * @returns {Promise<object[]>} Presence[]
   */
  async presence(users) {
    return this.#presenceRequests('presenceQuery', users);
  }

  /**
   * Subscribes to the presence of `users`: returns their presence now, changes follow as
   * `presence` events. Renewed after every reconnect.
   * @param {string[]} users
   * @returns {Promise<object[]>} Presence[]
   */
  async subscribePresence(users) {
    return this.#presenceRequests('presenceSubscribe', users);
  }

  /**
   * Ends presence subscriptions (succeeds while disconnected: the broker ended them anyway).
   * @param {string[]} users
   * @returns {Promise<void>}
   */
  async unsubscribePresence(users) {
    const parts = chunks([...users], this.#maxPresenceUsers());
    await Promise.all(parts.map((part) => this.#request('presenceUnsubscribe', { users: part })));
  }

  /**
   * Replaces the session's token before it expires (`RefreshToken`). The broker verifies it
   * like the first and requires the same user; until it accepts, the session keeps its old
   * token, and a session whose token expires is closed (`disconnected` with reason
   * `DISCONNECT_REASON_TOKEN_EXPIRED`). With a static `options.token`, an accepted token is
   * also the one reconnects use from then on.
   * Rejects with `ERROR_CODE_UNAUTHENTICATED` or `ERROR_CODE_TOKEN_EXPIRED` for a rejected token
   * and `ERROR_CODE_FORBIDDEN` for another user's, each with its `reason` (`expired`,
   * `bad_signature`, `subject_mismatch`, ...).
   * @param {string} token
   * @returns {Promise<bigint>} the new token's expiry, ms since the epoch
   */
  async refreshToken(token) {
    if (typeof token !== 'string' || token === '') throw new TypeError('token must be a non-empty string');
    const ok = await this.#request('refreshToken', { token });
    if (!this.#opts.tokenProvider) this.#opts.token = token;
    return ok.expiresAtMs;
  }

  /**
   * Pings the broker.
   * @returns {Promise<number>} the round trip in milliseconds
   */
  async ping() {
    const start = now();
    await this.#request('ping', {});
    return now() - start;
  }

  /**
   * Closes the connection and stops reconnecting. Unanswered requests and sends reject with
   * `CLOSED`; resolves after the `closed` event. Closing twice is harmless.
   * @returns {Promise<void>}
   */
  async close() {
    this.#shutdown(null);
  }

  // --- events --------------------------------------------------------------------------------

  #emit(type, data) {
    this.#noteDelivery(type, data);
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        fn(data);
      } catch (error) {
        reportListenerError(error);
      }
    }
  }

  #emitAll(events) {
    for (const { type, data } of events) this.#emit(type, data);
  }

  /** Only messages the application can receive are acknowledged as delivered. */
  #noteDelivery(type, data) {
    if (type === 'message' && this.#listeners.get('message')?.size) {
      this.#delivery.emitted(data.conversationId, data.seq);
    } else if (type === 'revoked' || type === 'reset'
      || (type === 'feed' && data.kind === 'FEED_EVENT_KIND_REMOVED')) {
      this.#delivery.forget(data.conversationId);
    }
  }

  // --- requests ------------------------------------------------------------------------------

  #takeRequestId() {
    const id = String(this.#nextId);
    this.#nextId += 1;
    return id;
  }

  #maxPresenceUsers() {
    return this.#link?.maxPresenceUsers ?? DEFAULT_MAX_PRESENCE_USERS;
  }

  async #presenceRequests(kind, users) {
    const parts = chunks([...users], this.#maxPresenceUsers());
    const lists = await Promise.all(parts.map((part) => this.#request(kind, { users: part })));
    return lists.flatMap((list) => list.presences);
  }

  /** Queues an application request; resolves with the decoded reply body. */
  #request(kind, body) {
    if (this.#closed) return Promise.reject(clientClosed());
    const link = this.#link;
    if (!link) return this.#requestOffline(kind, body);
    if (kind === 'presenceSubscribe') body.users.forEach((u) => this.#presenceSubs.add(u));
    if (kind === 'presenceUnsubscribe') body.users.forEach((u) => this.#presenceSubs.delete(u));
    return new Promise((resolve, reject) => {
      link.queue.push({ type: 'request', kind, body, resolve, reject });
      this.#pump(link);
    });
  }

  /** While disconnected requests fail fast, except unsubscribing (nothing to end). */
  #requestOffline(kind, body) {
    if (kind !== 'presenceUnsubscribe') return Promise.reject(connectionLost());
    body.users.forEach((u) => this.#presenceSubs.delete(u));
    return Promise.resolve({});
  }

  #submitSend(send) {
    if (this.#closed) return Promise.reject(clientClosed());
    return new Promise((resolve, reject) => {
      const key = this.#nextSend++;
      this.#sends.set(key, { send, resolve, reject });
      const link = this.#link;
      if (link?.sendsEnabled) {
        link.queue.push({ type: 'send', key });
        this.#pump(link);
      }
    });
  }

  // --- connecting ----------------------------------------------------------------------------

  async #token() {
    if (!this.#opts.tokenProvider) return this.#opts.token;
    try {
      return await this.#opts.tokenProvider();
    } catch (error) {
      throw new SwitchboardError('TOKEN_PROVIDER', `token provider failed: ${error?.message ?? error}`);
    }
  }

  /**
   * One attempt within `connectTimeoutMs`: token, WebSocket, Hello, Welcome. Resolves with
   * `{ok: true, session}` or `{ok: false, error, permanent, retryAfterMs}`.
   */
  async #establish(position, helloId, expectedUser) {
    const attempt = { socket: null, abandoned: false };
    this.#attempt = attempt;
    let timer = null;
    const timeout = new Promise((resolve) => {
      const error = new SwitchboardError('TIMEOUT', 'connecting timed out');
      timer = setTimeout(() => resolve(transient(error)), this.#opts.connectTimeoutMs);
    });
    const result = await Promise.race([this.#handshake(attempt, position, helloId, expectedUser), timeout]);
    clearTimeout(timer);
    this.#attempt = null;
    if (result.ok && !attempt.abandoned) {
      return { ok: true, session: { socket: attempt.socket, welcome: result.welcome } };
    }
    attempt.abandoned = true;
    attempt.socket?.close();
    return result.ok ? transient(clientClosed()) : result;
  }

  async #handshake(attempt, position, helloId, expectedUser) {
    try {
      const token = await this.#token();
      if (attempt.abandoned) return transient(clientClosed());
      const socket = new Socket(this.#WebSocket, this.#opts.url);
      attempt.socket = socket;
      await socket.opened();
      const client = this.#opts.clientName;
      const hello = { protocolVersion: PROTOCOL_VERSION, token, resume: position, client };
      socket.send(encodeFrame(helloId, 'hello', hello));
      const first = decodeFrame(await socket.nextFrame());
      return checkWelcome(first, helloId, expectedUser, !this.#opts.tokenProvider);
    } catch (error) {
      return transient(error instanceof SwitchboardError ? error
        : new SwitchboardError('CONNECT_FAILED', String(error?.message ?? error)));
    }
  }

  /** Sets up the link of a fresh session; it starts working once activated. */
  #openLink(session, reconnect) {
    const link = new Link({ ...session, reconnect });
    this.#link = link;
    this.#welcome = session.welcome;
    this.#sessionId = session.welcome.sessionId;
    return link;
  }

  /** Emits `connected`, applies Welcome.resumed, handles queued frames and starts the timers. */
  #activate(link) {
    if (link !== this.#link) return;
    link.active = true;
    const welcome = this.#welcome;
    if (!welcome.capabilities.includes('receipts')) this.#delivery.suspend();
    link.heartbeatTimer = setInterval(() => this.#onHeartbeat(link), link.heartbeatMs);
    const { userId, sessionId } = welcome;
    this.#emit('connected', { userId, sessionId, reconnect: link.reconnect });
    if (link !== this.#link) return;
    if (welcome.resumed) {
      this.#state.beginPass();
      link.pass.running = true;
      this.#onSyncPage(link, welcome.resumed);
    } else {
      this.#state.requestSync(); // a broker that ignored `resume`: a regular pass does the same
    }
    const { socket } = link;
    for (const text of socket.drain()) this.#onSocketFrame(link, text);
    if (link !== this.#link) return;
    socket.onFrame = (text) => this.#onSocketFrame(link, text);
    socket.onClose = () => this.#lose(link, lostWithout('connection closed by the broker'));
    if (socket.closed) this.#lose(link, lostWithout('connection closed by the broker'));
    else this.#pump(link);
  }

  /** Backs off and reconnects until a session is established, the client closes, or a
   * failure is permanent. */
  async #reconnect(floorMs) {
    for (let attempt = 0; !this.#closed; attempt++) {
      await this.#sleep(backoffDelay(this.#opts.reconnect, attempt, floorMs));
      if (this.#closed) return;
      const result = await this.#establish(this.#state.wirePosition(), this.#takeRequestId(), this.#userId);
      if (this.#closed) {
        result.session?.socket.close();
        return;
      }
      if (result.ok) {
        this.#activate(this.#openLink(result.session, true));
        return;
      }
      if (result.permanent) {
        this.#shutdown(result.error);
        return;
      }
      floorMs = result.retryAfterMs;
    }
  }

  /** Waits `ms`; ends early when the client closes. */
  #sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.#wakeSleep = () => {
        clearTimeout(timer);
        resolve();
      };
    }).finally(() => {
      this.#wakeSleep = null;
    });
  }

  /** The link is gone: fail what it had in flight, tell the application, reconnect. */
  #lose(link, lost) {
    if (link !== this.#link) return;
    this.#link = null;
    this.#dropLink(link, connectionLost);
    this.#emit('disconnected', lost);
    if (this.#closed) return;
    if (this.#opts.reconnect === false) {
      this.#failSends(connectionLost);
      this.#shutdown(null);
      return;
    }
    this.#reconnect(lost.retryAfterMs).catch((error) => this.#shutdown(error));
  }

  #dropLink(link, error) {
    link.stopTimers();
    link.socket.close();
    this.#delivery.connectionLost();
    for (const pending of link.pending.values()) {
      if (pending.type === 'request') pending.reject(error());
    }
    for (const out of link.queue) {
      if (out.type === 'request') out.reject(error());
    }
    for (const waiter of [...link.pass.waiters, ...this.#syncWaiters.splice(0)]) waiter.reject(error());
    link.pass.waiters = [];
  }

  #failSends(error) {
    const sends = [...this.#sends.values()];
    this.#sends.clear();
    for (const { reject } of sends) reject(error());
  }

  /** Stops for good: fails what is left and emits `closed` (once). */
  #shutdown(error) {
    if (this.#finished) return;
    this.#closed = true;
    this.#finished = true;
    const link = this.#link;
    if (link) {
      this.#link = null;
      this.#dropLink(link, clientClosed);
    }
    if (this.#attempt) {
      this.#attempt.abandoned = true;
      this.#attempt.socket?.close();
    }
    this.#wakeSleep?.();
    this.#failSends(clientClosed);
    this.#emit('closed', { error: error ?? undefined });
  }

  // --- writing -------------------------------------------------------------------------------

  /**
   * Starts a sync pass if one is needed, queues the delivery receipts that are due, then
   * writes queued frames while in-flight slots are free.
   */
  #pump(link) {
    if (link !== this.#link || !link.active || this.#pumping) return;
    this.#pumping = true;
    let broken = false;
    try {
      this.#maybeStartPass(link);
      this.#queueDueReceipts(link);
      while (link.queue.length > 0 && link.hasFreeSlot()) {
        if (!this.#write(link, link.queue.shift())) {
          broken = true;
          break;
        }
      }
      this.#scheduleDelivery(link);
    } finally {
      this.#pumping = false;
    }
    if (broken) this.#lose(link, lostWithout('the WebSocket stopped accepting frames'));
  }

  /** Writes one queued frame; false when the socket is broken. */
  #write(link, out) {
    const frame = this.#frameOf(link, out);
    if (!frame) return true;
    const id = this.#takeRequestId();
    const text = encodeFrame(id, frame.kind, frame.body);
    if (byteLength(text, link.maxMessageBytes) > link.maxMessageBytes) {
      this.#rejectPending(link, frame.pending,
        new SwitchboardError('FRAME_TOO_LARGE', `the ${frame.kind} frame exceeds the broker's limit`));
      return true;
    }
    if (!link.socket.send(text)) {
      // Not written: requests fail like in-flight ones, sends stay for the next link.
      if (frame.pending.type === 'request') frame.pending.reject(connectionLost());
      return false;
    }
    link.pending.set(id, frame.pending);
    return true;
  }

  /** The frame for a queued item and what its reply is for (`null`: nothing to write). */
  #frameOf(link, out) {
    switch (out.type) {
      case 'request': {
        const subscribed = out.kind === 'presenceSubscribe' ? out.body.users : [];
        const { kind, resolve, reject } = out;
        const pending = { type: 'request', kind, resolve, reject, subscribed };
        return { kind: out.kind, body: out.body, pending };
      }
      case 'send': {
        const entry = this.#sends.get(out.key);
        return entry ? { kind: 'send', body: entry.send, pending: { type: 'send', key: out.key } } : null;
      }
      case 'sync': {
        const continuation = link.pass.continuation || undefined;
        const body = { position: this.#state.wirePosition(), continuation };
        return { kind: 'sync', body, pending: { type: 'sync' } };
      }
      case 'ping':
        return { kind: 'ping', body: {}, pending: { type: 'ping' } };
      default: // internal
        return { kind: out.kind, body: out.body, pending: { type: 'internal', purpose: out.purpose } };
    }
  }

  /** Fails a request without closing the connection. */
  #rejectPending(link, pending, error) {
    switch (pending.type) {
      case 'request':
        pending.subscribed.forEach((u) => this.#presenceSubs.delete(u));
        pending.reject(error);
        break;
      case 'send': {
        const entry = this.#sends.get(pending.key);
        this.#sends.delete(pending.key);
        entry?.reject(error);
        break;
      }
      case 'sync':
        this.#failPass(link, 0, error);
        break;
      case 'ping':
        link.pingOutstanding = false;
        break;
      default:
        break; // an automatic request: dropped
    }
  }

  #queueDueReceipts(link) {
    if (!link.sendsEnabled) return;
    for (const [conversationId, seq] of this.#delivery.due(now())) {
      const body = { conversationId, seq };
      link.queue.push({ type: 'internal', purpose: 'delivered', kind: 'markDelivered', body });
    }
  }

  #scheduleDelivery(link) {
    clearTimeout(link.deliveryTimer);
    link.deliveryTimer = null;
    const at = link.sendsEnabled ? this.#delivery.nextDue() : null;
    if (at !== null) link.deliveryTimer = setTimeout(() => this.#pump(link), Math.max(0, at - now()));
  }

  #onHeartbeat(link) {
    const silentMs = now() - link.lastRead;
    if (silentMs >= link.deadAfterMs) {
      this.#lose(link, lostWithout(`no frame from the broker for ${Math.round(silentMs)} ms`));
      return;
    }
    if (!link.pingOutstanding) {
      link.pingOutstanding = true;
      link.queue.unshift({ type: 'ping' });
      this.#pump(link);
    }
  }

  // --- sync passes ---------------------------------------------------------------------------

  #maybeStartPass(link) {
    if (link.pass.running || link.pass.retryTimer !== null) return;
    if (!this.#state.needsSync && this.#syncWaiters.length === 0) return;
    this.#state.beginPass();
    link.pass.running = true;
    link.pass.continuation = '';
    link.pass.waiters = this.#syncWaiters.splice(0);
    link.queue.unshift({ type: 'sync' });
  }

  #onSyncPage(link, page) {
    const { events, continuation } = this.#state.applyPage(page);
    this.#emitAll(events);
    if (link !== this.#link) return;
    if (continuation) {
      link.pass.continuation = continuation;
      link.queue.unshift({ type: 'sync' });
      return;
    }
    link.pass.running = false;
    this.#state.endPass();
    for (const waiter of link.pass.waiters.splice(0)) waiter.resolve();
    this.#endResumePass(link);
  }

  /** A Sync request failed: tell the pass's waiters and retry after a while. */
  #failPass(link, retryAfterMs, error) {
    link.pass.running = false;
    this.#state.requestSync();
    link.pass.retryTimer = setTimeout(() => {
      link.pass.retryTimer = null;
      this.#pump(link);
    }, Math.max(retryAfterMs, SYNC_RETRY_MS));
    for (const waiter of link.pass.waiters.splice(0)) waiter.reject(error);
    this.#endResumePass(link);
  }

  /** After the first pass of a link: re-send unanswered sends, renew presence subscriptions. */
  #endResumePass(link) {
    if (!link.pass.resume) return;
    link.pass.resume = false;
    link.sendsEnabled = true;
    for (const key of this.#sends.keys()) link.queue.push({ type: 'send', key });
    if (link.reconnect && this.#presenceSubs.size > 0) {
      for (const users of chunks([...this.#presenceSubs], link.maxPresenceUsers)) {
        const body = { users };
        link.queue.push({ type: 'internal', purpose: 'resubscribe', kind: 'presenceSubscribe', body });
      }
    }
  }

  // --- reading -------------------------------------------------------------------------------

  #onSocketFrame(link, text) {
    if (link !== this.#link) return;
    link.lastRead = now();
    let frame;
    try {
      if (text === null) throw new TypeError('a binary message on the JSON subprotocol');
      frame = decodeFrame(text);
    } catch (error) {
      this.#lose(link, lostWithout(`protocol violation: undecodable frame (${error.message})`));
      return;
    }
    const lost = this.#onFrame(link, frame);
    if (lost) this.#lose(link, lost);
    else this.#pump(link);
  }

  /** Handles one frame; returns why the link must end, or null. */
  #onFrame(link, { requestId, kind, body }) {
    if (kind === 'disconnect') {
      return { reason: body.reason, message: body.message, retryAfterMs: Number(body.retryAfterMs) };
    }
    if (kind === null) {
      // A frame type this client does not know (a newer broker): fail its request.
      const pending = link.pending.get(requestId);
      link.pending.delete(requestId);
      if (pending) this.#rejectPending(link, pending, protocolError('unknown reply type'));
      return null;
    }
    if (requestId === '0') return this.#onPush(kind, body);
    const pending = link.pending.get(requestId);
    if (!pending) return violation(`a reply to unknown request ${requestId}`);
    link.pending.delete(requestId);
    return this.#onReply(link, pending, kind, body);
  }

  #onPush(kind, body) {
    switch (kind) {
      case 'message':
        this.#emitAll(this.#state.applyMessage(body));
        return null;
      case 'feedEvent':
        this.#emitAll(this.#state.applyFeedEvent(body));
        return null;
      case 'presence':
        this.#emit('presence', body);
        return null;
      case 'typing':
        // The user's other devices typing are not news to this one.
        if (body.userId !== this.#userId) this.#emit('typing', body);
        return null;
      case 'receiptEvent':
        if (body.userId === this.#userId) this.#delivery.confirmed(body.conversationId, body.deliveredSeq);
        this.#emit('receipt', body);
        return null;
      case 'error':
        return null; // connection-level; the Disconnect that follows ends the link
      default:
        return violation(`a ${kind} reply without request id`);
    }
  }

  #onReply(link, pending, kind, body) {
    switch (pending.type) {
      case 'ping':
        link.pingOutstanding = false;
        return null;
      case 'sync':
        return this.#onSyncReply(link, kind, body);
      case 'send':
        return this.#onSendReply(pending.key, kind, body);
      case 'internal':
        return this.#onInternalReply(pending.purpose, kind, body);
      default:
        return this.#onRequestReply(link, pending, kind, body);
    }
  }

  #onSyncReply(link, kind, body) {
    if (kind === 'sync') {
      this.#onSyncPage(link, body);
      return null;
    }
    if (kind === 'error') {
      this.#failPass(link, Number(body.retryAfterMs), SwitchboardError.fromWire(body));
      return null;
    }
    return violation(`a ${kind} reply to sync`);
  }

  #onSendReply(key, kind, body) {
    const entry = this.#sends.get(key);
    if (kind !== 'sendAck' && kind !== 'error') {
      this.#sends.delete(key);
      entry?.reject(protocolError(`a ${kind} reply to send`));
      return violation(`a ${kind} reply to send`);
    }
    if (!entry) return null;
    this.#sends.delete(key);
    if (kind === 'error') {
      entry.reject(SwitchboardError.fromWire(body));
      return null;
    }
    this.#emitAll(this.#state.applyOwnAck(this.#userId, entry.send, body));
    entry.resolve(body);
    return null;
  }

  /** The reply to a request of the client's own: consumed here, errors ignored. */
  #onInternalReply(purpose, kind, body) {
    if (purpose === 'delivered' && kind === 'receipt') {
      this.#delivery.confirmed(body.conversationId, body.deliveredSeq);
    } else if (purpose === 'resubscribe' && kind === 'presences') {
      for (const presence of body.presences) this.#emit('presence', presence);
    } else if (kind === 'error') {
      if (purpose === 'delivered' && body.code === 'ERROR_CODE_UNSUPPORTED') this.#delivery.suspend();
    } else {
      return violation(`a ${kind} reply to an automatic ${purpose} request`);
    }
    return null;
  }

  #onRequestReply(link, pending, kind, body) {
    if (kind === 'error') {
      pending.subscribed.forEach((u) => this.#presenceSubs.delete(u));
      pending.reject(SwitchboardError.fromWire(body));
      return null;
    }
    if (kind !== EXPECTED_REPLY[pending.kind]) {
      this.#rejectPending(link, pending, protocolError(`a ${kind} reply to ${pending.kind}`));
      return violation(`a ${kind} reply to ${pending.kind}`);
    }
    this.#observe(kind, body);
    pending.resolve(body);
    return null;
  }

  /** Replies that reveal log entries make the state sync (R10); receipts confirm delivery. */
  #observe(kind, body) {
    if (kind === 'receipt') this.#delivery.confirmed(body.conversationId, body.deliveredSeq);
    else if (kind === 'conversation') this.#state.expectSeq(body.conversationId, body.lastSeq);
    else if (kind === 'membership' && body.seq > 0n) this.#state.expectSeq(body.conversationId, body.seq);
  }
}

const CONSTRUCT = Symbol('construct');

function lostWithout(message) {
  return { reason: null, message, retryAfterMs: 0 };
}

function violation(what) {
  return lostWithout(`protocol violation: ${what}`);
}

function transient(error, retryAfterMs = 0) {
  return { ok: false, error, permanent: false, retryAfterMs };
}

/** Classifies the first frame of a connection: a Welcome, or why the attempt failed. */
function checkWelcome({ requestId, kind, body }, helloId, expectedUser, staticToken) {
  if (kind === 'welcome' && requestId === helloId) {
    if (body.protocolVersion !== 0 && body.protocolVersion !== PROTOCOL_VERSION) {
      return { ok: false, permanent: true, retryAfterMs: 0,
        error: protocolError(`the broker speaks protocol version ${body.protocolVersion}`) };
    }
    if (expectedUser !== null && body.userId !== expectedUser) {
      return { ok: false, permanent: true, retryAfterMs: 0,
        error: protocolError(`reconnected as user ${body.userId}, expected ${expectedUser}`) };
    }
    return { ok: true, welcome: body };
  }
  if (kind === 'error') {
    const error = SwitchboardError.fromWire(body);
    const permanent = error.code === 'ERROR_CODE_PROTOCOL_VERSION'
      || ((error.code === 'ERROR_CODE_UNAUTHENTICATED' || error.code === 'ERROR_CODE_TOKEN_EXPIRED')
        && staticToken);
    return { ok: false, error, permanent, retryAfterMs: error.retryAfterMs };
  }
  if (kind === 'disconnect') {
    const auth = body.reason === 'DISCONNECT_REASON_AUTH_FAILED';
    const code = auth ? 'ERROR_CODE_UNAUTHENTICATED' : 'ERROR_CODE_UNAVAILABLE';
    const retryAfterMs = Number(body.retryAfterMs);
    const message = `disconnected during handshake (${body.reason}): ${body.message}`;
    const error = new SwitchboardError(code, message, retryAfterMs);
    return { ok: false, error, permanent: auth && staticToken, retryAfterMs };
  }
  return transient(protocolError(`expected Welcome to request ${helloId}, got ${kind}`));
}
