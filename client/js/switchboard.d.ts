// TypeScript declarations of switchboard.js, the browser client of the Switchboard broker.
// The contract is API.md; the wire protocol docs/protocol.md. Every 64-bit field of the
// protocol (seq, userSeq, timestampMs, lastSeq, …) is a `bigint`; 32-bit ones are `number`;
// enums are their protobuf names. Fields the broker omits (default values) are filled in:
// 0n / 0 / '' / false / [] / the `*_UNSPECIFIED` name. Nested messages and oneof cases that
// are absent stay `undefined` (hence optional here).

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

export type ErrorCode =
  | 'ERROR_CODE_UNSPECIFIED'
  | 'ERROR_CODE_BAD_REQUEST'
  | 'ERROR_CODE_UNAUTHENTICATED'
  | 'ERROR_CODE_FORBIDDEN'
  | 'ERROR_CODE_NOT_FOUND'
  | 'ERROR_CODE_UNSUPPORTED'
  | 'ERROR_CODE_RATE_LIMITED'
  | 'ERROR_CODE_UNAVAILABLE'
  | 'ERROR_CODE_NOT_LEADER'
  | 'ERROR_CODE_TOO_LARGE'
  | 'ERROR_CODE_PROTOCOL_VERSION'
  | 'ERROR_CODE_ALREADY_EXISTS'
  | 'ERROR_CODE_LIMIT_EXCEEDED'
  | 'ERROR_CODE_INTERNAL'
  | 'ERROR_CODE_TOKEN_EXPIRED'
  | 'ERROR_CODE_STORAGE_FULL';

/**
 * Codes of failures detected by the client itself:
 * - `CONNECTION_LOST`: the connection dropped while the request was in flight (its outcome is
 *   unknown), or a request other than a send was made while disconnected;
 * - `CLOSED`: the client was closed (or stopped for good);
 * - `TIMEOUT`: connecting and the handshake took longer than `connectTimeoutMs`;
 * - `CONNECT_FAILED`: the WebSocket could not be opened;
 * - `TOKEN_PROVIDER`: `tokenProvider` threw or rejected;
 * - `FRAME_TOO_LARGE`: the request is larger than the broker accepts (not sent);
 * - `PROTOCOL`: the broker broke the protocol (unexpected reply, wrong user, version).
 */
export type ClientErrorCode =
  | 'CONNECTION_LOST'
  | 'CLOSED'
  | 'TIMEOUT'
  | 'CONNECT_FAILED'
  | 'TOKEN_PROVIDER'
  | 'FRAME_TOO_LARGE'
  | 'PROTOCOL';

export type DisconnectReason =
  | 'DISCONNECT_REASON_UNSPECIFIED'
  | 'DISCONNECT_REASON_SHUTDOWN'
  | 'DISCONNECT_REASON_SLOW_CONSUMER'
  | 'DISCONNECT_REASON_PROTOCOL_ERROR'
  | 'DISCONNECT_REASON_AUTH_FAILED'
  | 'DISCONNECT_REASON_HELLO_TIMEOUT'
  | 'DISCONNECT_REASON_IDLE_TIMEOUT'
  | 'DISCONNECT_REASON_FRAME_TOO_LARGE'
  | 'DISCONNECT_REASON_SERVER_ERROR'
  | 'DISCONNECT_REASON_RATE_LIMITED'
  | 'DISCONNECT_REASON_CONNECTION_LIMIT'
  | 'DISCONNECT_REASON_TOKEN_EXPIRED'
  | 'DISCONNECT_REASON_CLOSED_BY_ADMIN';

export type FeedEventKind =
  | 'FEED_EVENT_KIND_UNSPECIFIED'
  | 'FEED_EVENT_KIND_ADDED'
  | 'FEED_EVENT_KIND_REMOVED';

export type ConversationKind =
  | 'CONVERSATION_KIND_UNSPECIFIED'
  | 'CONVERSATION_KIND_DIRECT'
  | 'CONVERSATION_KIND_GROUP';

export type HistoryVisibility =
  | 'HISTORY_VISIBILITY_UNSPECIFIED'
  | 'HISTORY_VISIBILITY_SHARED'
  | 'HISTORY_VISIBILITY_JOINED';

export type Role = 'ROLE_UNSPECIFIED' | 'ROLE_MEMBER' | 'ROLE_ADMIN';

// ---------------------------------------------------------------------------------------------
// Messages (as received)
// ---------------------------------------------------------------------------------------------

/** A message body: exactly one of `text` and `data` is set. */
export interface Content {
  /** MIME-like type chosen by the application; '' means text/plain. */
  contentType: string;
  text?: string;
  /** A binary body (base64 on the wire). */
  data?: Uint8Array;
}

/** Content as given to {@link Switchboard.send}: a string is `{text}`. */
export type ContentInput = string | { contentType?: string; text?: string; data?: Uint8Array };

export interface ConversationCreated {
  kind: ConversationKind;
  name: string;
  members: string[];
  visibility: HistoryVisibility;
}

/** A system entry: exactly one case is set (none for a kind this client does not know). */
export interface SystemEvent {
  created?: ConversationCreated;
  membersAdded?: { users: string[] };
  membersRemoved?: { users: string[] };
  memberLeft?: { user: string };
}

/** An entry of a conversation's log: a user message (`content`) or a system entry (`system`). */
export interface Message {
  conversationId: string;
  seq: bigint;
  sender: string;
  timestampMs: bigint;
  /** The sender's idempotency key; '' for system entries. */
  clientMsgId: string;
  content?: Content;
  system?: SystemEvent;
}

export interface SendAck {
  conversationId: string;
  seq: bigint;
  timestampMs: bigint;
  clientMsgId: string;
  /** The key was used before: this is the original message's ack, nothing was stored now. */
  duplicate: boolean;
}

/** An event of the user's membership feed. */
export interface FeedEvent {
  userSeq: bigint;
  kind: FeedEventKind;
  conversationId: string;
  /** The seq of the system entry that caused it (1 for creation). */
  conversationSeq: bigint;
  actor: string;
  timestampMs: bigint;
  conversationKind: ConversationKind;
  conversationName: string;
}

export interface Conversation {
  conversationId: string;
  kind: ConversationKind;
  name: string;
  visibility: HistoryVisibility;
  createdAtMs: bigint;
  createdBy: string;
  /** False when the conversation already existed. */
  created: boolean;
  lastSeq: bigint;
  memberCount: number;
}

export interface MembershipResult {
  conversationId: string;
  /** The seq of the system entry; 0n when nothing changed. */
  seq: bigint;
  changed: string[];
}

export interface ConversationSummary {
  conversationId: string;
  kind: ConversationKind;
  name: string;
  visibility: HistoryVisibility;
  role: Role;
  lastSeq: bigint;
  readSeq: bigint;
  unreadCount: bigint;
  firstSeq: bigint;
  lastActivityMs: bigint;
  memberCount: number;
}

export interface ConversationList {
  conversations: ConversationSummary[];
  hasMore: boolean;
  /** The `after` of the next page when `hasMore`. */
  nextAfter: string;
}

export interface Member {
  userId: string;
  role: Role;
  joinedSeq: bigint;
}

export interface MemberList {
  conversationId: string;
  members: Member[];
  hasMore: boolean;
  nextAfter: string;
}

export interface HistoryPage {
  conversationId: string;
  /** Ascending by seq, contiguous. */
  messages: Message[];
  /** More entries exist beyond this page in the requested direction. */
  hasMore: boolean;
  firstSeq: bigint;
  lastSeq: bigint;
}

/** A member's watermarks (reply to markRead, `receipt` event, entry of a ReceiptList). */
export interface Receipt {
  /** Empty inside a ReceiptList (use the list's). */
  conversationId: string;
  userId: string;
  deliveredSeq: bigint;
  readSeq: bigint;
}

export interface ReceiptList {
  conversationId: string;
  receipts: Receipt[];
  hasMore: boolean;
  nextAfter: string;
}

export interface Presence {
  userId: string;
  online: boolean;
  devices: number;
  /** Online: since when; offline: when last seen; 0n: never seen. */
  lastSeenMs: bigint;
}

export interface TypingEvent {
  conversationId: string;
  userId: string;
  active: boolean;
  /** Hide the indicator this long after the event unless renewed. */
  expiresInMs: number;
}

/** `Welcome.limits`: the limits the broker enforces (0 when the broker does not announce one). */
export interface Limits {
  maxFrameBytes: number;
  maxBodyBytes: number;
  maxHistoryLimit: number;
  maxSyncLimit: number;
  maxInflight: number;
  maxGroupMembers: number;
  maxMembersPerRequest: number;
  maxIdBytes: number;
  maxConversationIdBytes: number;
  maxPresenceUsers: number;
  maxPresenceSubscriptions: number;
  sendRatePerSec: number;
  sendBurst: number;
}

export interface CursorReset {
  conversationId: string;
  firstSeq: bigint;
  lastSeq: bigint;
}

/** A SyncPage as decoded (`continuation` stays the base64 text of the wire). */
export interface SyncPage {
  feedEvents: FeedEvent[];
  messages: Message[];
  resets: CursorReset[];
  revoked: string[];
  feedPosition: bigint;
  continuation: string;
  hasMore: boolean;
}

// ---------------------------------------------------------------------------------------------
// Positions, options, events
// ---------------------------------------------------------------------------------------------

/** A 64-bit value as accepted from the application. */
export type SeqLike = bigint | number | string;

/** The client's position: the feed position and, per conversation, the highest seq applied. */
export interface Position {
  feedPosition: bigint;
  cursors: Map<string, bigint>;
}

/** A saved position, e.g. parsed back from JSON (numbers and decimal strings are accepted). */
export interface PositionInput {
  feedPosition?: SeqLike;
  cursors?: Map<string, SeqLike> | Record<string, SeqLike> | Array<{ conversationId: string; seq: SeqLike }>;
}

/** What the client needs of a WebSocket (the browser's and Node's global one qualify). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly url: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void, options?: { once?: boolean }): void;
}

export type WebSocketConstructorLike = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ReconnectPolicy {
  /** Ceiling of the first backoff (default 200). */
  baseMs?: number;
  /** Largest ceiling (default 30 000). */
  capMs?: number;
}

export interface SwitchboardOptions {
  /** `ws(s)://host:port/ws`; in a page it defaults to `/ws` on the page's host. */
  url?: string;
  /** A JWT. With a static token a rejected token at reconnect stops the client. */
  token?: string;
  /** Called for every connection attempt (preferred: tokens are only checked at Hello). */
  tokenProvider?: () => string | Promise<string>;
  /** The saved position to resume from (default: from the beginning). */
  position?: PositionInput;
  /** Backoff of the automatic reconnect, or `false` to close on the first loss. */
  reconnect?: ReconnectPolicy | false;
  /** Send MarkDelivered for emitted messages on its own (default true). */
  autoDeliveryReceipts?: boolean;
  /** Retries of a send rejected with RATE_LIMITED (default 3). */
  sendRateLimitRetries?: number;
  /** Time limit of one attempt: token, WebSocket open, Hello, Welcome (default 10 000). */
  connectTimeoutMs?: number;
  /** Sent in Hello.client (default `switchboard-js/<version>`). */
  clientName?: string;
  /** The WebSocket class (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructorLike;
}

export interface ConnectedEvent {
  userId: string;
  sessionId: string;
  /** False for the first connection. */
  reconnect: boolean;
}

export interface DisconnectedEvent {
  /** The reason of the broker's Disconnect frame; null when the connection ended without one. */
  reason: DisconnectReason | null;
  message: string;
  /** The broker's retryAfterMs (0 when none); the next attempt waits at least this long. */
  retryAfterMs: number;
}

export interface ClosedEvent {
  /** Why the client stopped on its own (a permanent failure); undefined after close(). */
  error?: SwitchboardError;
}

export interface SwitchboardEvents {
  /** The next entry of a conversation's log: in seq order, exactly once, own sends included. */
  message: Message;
  /** The next event of the membership feed, in userSeq order. */
  feed: FeedEvent;
  presence: Presence;
  /** Another user typing (the own user's events are not emitted). */
  typing: TypingEvent;
  /** A member's watermarks advanced (another user's, or the own user's from another device). */
  receipt: Receipt;
  /** The cursor was invalid; the log is delivered again from `firstSeq`. */
  reset: CursorReset;
  /** The user is no longer a member; its cursor was dropped. */
  revoked: { conversationId: string };
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  /** The last event. */
  closed: ClosedEvent;
}

export type SwitchboardEventType = keyof SwitchboardEvents;

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/** A failed request or connection attempt. */
export class SwitchboardError extends Error {
  constructor(
    code: ErrorCode | ClientErrorCode,
    message: string,
    retryAfterMs?: number,
    reason?: string,
  );
  readonly name: 'SwitchboardError';
  readonly code: ErrorCode | ClientErrorCode;
  /** For RATE_LIMITED and UNAVAILABLE: wait at least this long before retrying (else 0). */
  readonly retryAfterMs: number;
  /**
   * The broker's machine-readable `Error.reason` ('' when none), e.g. for a rejected token
   * `expired`, `bad_signature`, `unknown_kid`, `subject_mismatch` (docs/protocol.md).
   */
  readonly reason: string;
}

export class Switchboard {
  private constructor();

  /**
   * Connects and authenticates (one attempt, no retry; rejects with a SwitchboardError), then
   * keeps the connection alive. Events start in the next task: listeners registered right
   * after `await Switchboard.connect(…)` see everything, `connected` included.
   */
  static connect(options: SwitchboardOptions): Promise<Switchboard>;

  /** The authenticated user (from the Welcome). */
  readonly userId: string;
  /** The broker's id of the current (or last) connection. */
  readonly sessionId: string;
  /** True while a connection is established. */
  readonly connected: boolean;
  /** Welcome.capabilities of the current (or last) connection. */
  readonly capabilities: string[];
  /** Welcome.limits of the current (or last) connection. */
  readonly limits: Limits;
  /** The position after every event emitted so far (a fresh copy on each read). */
  readonly position: Position;

  on<K extends SwitchboardEventType>(type: K, fn: (event: SwitchboardEvents[K]) => void): this;
  off<K extends SwitchboardEventType>(type: K, fn: (event: SwitchboardEvents[K]) => void): this;

  /** Creates (or returns the existing) direct conversation with `other`. */
  createDirect(other: string): Promise<Conversation>;
  /** Creates a group (the caller is its admin); with `id` a retried create is idempotent. */
  createGroup(
    name: string,
    members?: Iterable<string>,
    options?: { visibility?: 'shared' | 'joined' | HistoryVisibility; id?: string },
  ): Promise<Conversation>;
  addMembers(conversationId: string, users: Iterable<string>): Promise<MembershipResult>;
  removeMembers(conversationId: string, users: Iterable<string>): Promise<MembershipResult>;
  leave(conversationId: string): Promise<MembershipResult>;
  listConversations(options?: { after?: string; limit?: number }): Promise<ConversationList>;
  listMembers(conversationId: string, options?: { after?: string; limit?: number }): Promise<MemberList>;

  /**
   * Sends a message (also emitted as a `message` event, in order). Retried across reconnects
   * with the same clientMsgId; waits while disconnected; RATE_LIMITED is retried
   * `sendRateLimitRetries` times after the broker's retryAfterMs.
   */
  send(conversationId: string, content: ContentInput, options?: { clientMsgId?: string }): Promise<SendAck>;
  /** One page of the log: newest (no anchor), before a seq, or after a seq. */
  history(
    conversationId: string,
    anchor?: { before?: SeqLike; after?: SeqLike },
    limit?: number,
  ): Promise<HistoryPage>;
  /** Runs a full sync pass that starts after this call. */
  sync(): Promise<void>;

  /** Marks everything up to `seq` as read; resolves with the user's own watermarks. */
  markRead(conversationId: string, seq: SeqLike): Promise<Receipt>;
  /** One page of every member's watermarks. */
  receipts(conversationId: string, options?: { after?: string; limit?: number }): Promise<ReceiptList>;
  /** Started/stopped typing; never retried. */
  typing(conversationId: string, active: boolean): Promise<void>;
  presence(users: Iterable<string>): Promise<Presence[]>;
  /** Subscribes (renewed after every reconnect) and returns the users' presence now. */
  subscribePresence(users: Iterable<string>): Promise<Presence[]>;
  unsubscribePresence(users: Iterable<string>): Promise<void>;
  /**
   * Replaces the session's token before it expires; resolves with the new token's expiry (ms
   * since the epoch). Another user's token is refused (`ERROR_CODE_FORBIDDEN`, reason
   * `subject_mismatch`); a session whose token expires is closed with
   * `DISCONNECT_REASON_TOKEN_EXPIRED`. With a static `token`, reconnects use the new one.
   */
  refreshToken(token: string): Promise<bigint>;
  /** Round trip in milliseconds. */
  ping(): Promise<number>;
  /** Closes for good; unanswered requests and sends reject with CLOSED. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Building blocks (sans I/O), exported for tests and custom transports
// ---------------------------------------------------------------------------------------------

/** What the client rule asks the caller to emit. */
export type SyncEvent =
  | { type: 'message'; data: Message }
  | { type: 'feed'; data: FeedEvent }
  | { type: 'reset'; data: CursorReset }
  | { type: 'revoked'; data: { conversationId: string } };

/** Own send as kept by the client (what {@link SyncState.applyOwnAck} needs). */
export interface OwnSend {
  conversationId: string;
  clientMsgId: string;
  content: Content;
}

/** The client rule of docs/protocol.md section 16 (cursors, reordering buffers, sync need). */
export class SyncState {
  constructor(position?: PositionInput, bufferLimit?: number);
  readonly position: Position;
  wirePosition(): { feedPosition: bigint; cursors: Array<{ conversationId: string; seq: bigint }> };
  readonly needsSync: boolean;
  requestSync(): void;
  beginPass(): void;
  endPass(): void;
  expectSeq(conversationId: string, seq: bigint): void;
  applyMessage(message: Message): SyncEvent[];
  applyFeedEvent(event: FeedEvent): SyncEvent[];
  applyOwnAck(sender: string, send: OwnSend, ack: SendAck): SyncEvent[];
  applyPage(page: SyncPage): { events: SyncEvent[]; continuation: string | null };
}

/** Automatic MarkDelivered bookkeeping (times in ms of a monotonic clock). */
export class DeliveryTracker {
  constructor(enabled: boolean, windowMs?: number);
  emitted(conversationId: string, seq: bigint): void;
  confirmed(conversationId: string, deliveredSeq: bigint): void;
  forget(conversationId: string): void;
  suspend(): void;
  connectionLost(): void;
  due(now: number): Array<[string, bigint]>;
  nextDue(): number | null;
}

/** Full-jitter backoff: uniform in [0, min(capMs, baseMs·2^attempt)], at least `floorMs`. */
export function backoffDelay(
  policy: { baseMs: number; capMs: number },
  attempt: number,
  floorMs?: number,
): number;
