// Test support: Switchboard clients of a real broker, with their events recorded.
// (node --test also runs this file; it defines no tests.)

import { Switchboard } from '../../switchboard.js';
import { Recorder } from './broker.js';

/**
 * Connects `user` to `broker` and records its events. Extra options are passed to
 * `Switchboard.connect` (e.g. `position`, `WebSocket`).
 */
export async function connectUser(broker, user, options = {}) {
  const client = await Switchboard.connect({
    url: broker.url,
    tokenProvider: () => broker.token(user),
    reconnect: { baseMs: 50, capMs: 500 },
    ...options,
  });
  const rec = new Recorder(client);
  return { client, rec, user };
}

/** Waits until every recorder holds `count` messages of `conversationId`. */
export function untilMessages(recs, conversationId, count, ms = 15_000) {
  return Promise.all(recs.map((rec) => rec.until(
    (r) => r.messages(conversationId).length >= count,
    ms,
    `${count} messages of ${conversationId}`,
  )));
}

/** `seq:sender:text` of every message of a conversation, as the recorder saw them. */
export function logOf(rec, conversationId) {
  return rec.messages(conversationId).map((m) => `${m.seq}:${m.sender}:${m.content ? m.content.text : '<system>'}`);
}

/** Asserts-friendly check that seqs are 1..n (or from..n) without gaps or repeats. */
export function seqs(rec, conversationId) {
  return rec.messages(conversationId).map((m) => Number(m.seq));
}

export const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** A WebSocket class that remembers its instances, so a test can kill a client's socket. */
export function trackingWebSocket() {
  const sockets = [];
  class TrackingWebSocket extends globalThis.WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  return { WebSocket: TrackingWebSocket, sockets };
}
