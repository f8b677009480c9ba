// Pure tests of the client rule (SyncState), the delivery receipt coalescing
// (DeliveryTracker) and the backoff, mirroring client/src/state.rs, delivery.rs, backoff.rs.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { DeliveryTracker, SyncState, backoffDelay } from '../switchboard.js';

const msg = (conversationId, seq, sender = 'bob') => ({
  conversationId, seq: BigInt(seq), sender, timestampMs: 1000n + BigInt(seq),
  clientMsgId: `m${seq}`, content: { contentType: '', text: `hello ${seq}` },
});
const feed = (userSeq, kind, conversationId) => ({
  userSeq: BigInt(userSeq), kind: `FEED_EVENT_KIND_${kind}`, conversationId,
  conversationSeq: 1n, actor: 'bob', timestampMs: 0n,
  conversationKind: 'CONVERSATION_KIND_GROUP', conversationName: '',
});
const page = (fields = {}) => ({
  feedEvents: [], messages: [], resets: [], revoked: [], feedPosition: 0n,
  continuation: '', hasMore: false, ...fields,
});
const at = (feedPosition, cursors = {}) => new SyncState({ feedPosition, cursors });
const seqsOf = (events, conv) => events
  .filter((e) => e.type === 'message' && e.data.conversationId === conv)
  .map((e) => Number(e.data.seq));
const cursor = (state, conv) => state.position.cursors.get(conv);

describe('SyncState (the client rule)', () => {
  test('given a cursor when the next seq arrives should emit it and advance the cursor', () => {
    const s = at(0, { c: 4 });
    assert.deepEqual(s.applyMessage(msg('c', 5)), [{ type: 'message', data: msg('c', 5) }]);
    assert.equal(cursor(s, 'c'), 5n);
    assert.equal(s.needsSync, false);
  });

  test('given a cursor when an old or repeated seq arrives should drop it', () => {
    const s = at(0, { c: 4 });
    assert.deepEqual(s.applyMessage(msg('c', 4)), []);
    assert.deepEqual(s.applyMessage(msg('c', 1)), []);
    assert.equal(s.applyMessage(msg('c', 5)).length, 1);
    assert.deepEqual(s.applyMessage(msg('c', 5)), [], 'exactly once');
    assert.equal(cursor(s, 'c'), 5n);
    assert.equal(s.needsSync, false);
  });

  test('given a cursor when a seq beyond the next arrives should buffer it and need a sync', () => {
    const s = at(0, { c: 4 });
    assert.deepEqual(s.applyMessage(msg('c', 7)), []);
    assert.equal(cursor(s, 'c'), 4n);
    assert.equal(s.needsSync, true);
  });

  test('given a buffered gap when the missing seqs arrive should release the buffer in order', () => {
    const s = at(0, { c: 4 });
    s.applyMessage(msg('c', 8));
    s.applyMessage(msg('c', 6));
    s.applyMessage(msg('c', 7));
    assert.deepEqual(seqsOf(s.applyMessage(msg('c', 5)), 'c'), [5, 6, 7, 8]);
    assert.equal(cursor(s, 'c'), 8n);
  });

  test('given a buffered gap when a sync page fills it should release it and drop duplicates', () => {
    const s = at(0, { c: 4 });
    s.applyMessage(msg('c', 7));
    s.applyMessage(msg('c', 8));
    s.beginPass();
    const { events, continuation } = s.applyPage(page({ messages: [msg('c', 5), msg('c', 6), msg('c', 7)] }));
    assert.deepEqual(seqsOf(events, 'c'), [5, 6, 7, 8]);
    assert.equal(continuation, null);
    assert.equal(s.needsSync, false);
  });

  test('given no cursor when a live message arrives should buffer it and need a sync', () => {
    const s = at(0);
    assert.deepEqual(s.applyMessage(msg('new', 3)), []);
    assert.equal(s.needsSync, true);
    assert.equal(cursor(s, 'new'), undefined, 'a buffer is not a position');
  });

  test('given a full buffer when another gap message arrives should drop the buffer', () => {
    const s = new SyncState({ cursors: { c: 0 } }, 3);
    for (const seq of [3, 4, 5, 6]) s.applyMessage(msg('c', seq));
    const { events } = s.applyPage(page({ messages: [msg('c', 1), msg('c', 2)] }));
    assert.deepEqual(seqsOf(events, 'c'), [1, 2], '3, 4 and 5 were dropped on overflow');
    assert.deepEqual(seqsOf(s.applyMessage(msg('c', 3)), 'c'), [3]);
  });

  test('given a page for a conversation without cursor should start the cursor before its first entry', () => {
    const s = at(0);
    const { events } = s.applyPage(page({ messages: [msg('g', 12), msg('g', 13)] }));
    assert.deepEqual(seqsOf(events, 'g'), [12, 13]);
    assert.equal(cursor(s, 'g'), 13n);
  });

  test('given buffered live messages without cursor when pages arrive should deliver each once', () => {
    const s = at(0);
    s.applyMessage(msg('g', 3));
    s.applyMessage(msg('g', 5));
    assert.equal(s.needsSync, true);
    s.beginPass();
    assert.deepEqual(seqsOf(s.applyPage(page({ messages: [msg('g', 1), msg('g', 2), msg('g', 3)] })).events, 'g'), [1, 2, 3]);
    assert.deepEqual(seqsOf(s.applyPage(page({ messages: [msg('g', 4), msg('g', 5)] })).events, 'g'), [4, 5]);
    assert.equal(cursor(s, 'g'), 5n);
  });

  test('given a page with a reset should emit it, move the cursor to firstSeq - 1 and need a sync', () => {
    const s = at(0, { c: 90 });
    s.applyMessage(msg('c', 95));
    s.beginPass();
    const reset = { conversationId: 'c', firstSeq: 10n, lastSeq: 40n };
    const { events } = s.applyPage(page({ resets: [reset] }));
    assert.deepEqual(events, [{ type: 'reset', data: reset }]);
    assert.equal(cursor(s, 'c'), 9n);
    assert.equal(s.needsSync, true);
    assert.deepEqual(seqsOf(s.applyMessage(msg('c', 10)), 'c'), [10], 'the old buffer was dropped');
  });

  test('given a page with revoked ids should drop their cursors and emit revoked', () => {
    const s = at(0, { c: 5, d: 1 });
    const { events } = s.applyPage(page({ revoked: ['c'] }));
    assert.deepEqual(events, [{ type: 'revoked', data: { conversationId: 'c' } }]);
    assert.equal(cursor(s, 'c'), undefined);
    assert.equal(cursor(s, 'd'), 1n);
  });

  test('given a page with more should return its continuation', () => {
    const s = at(0);
    assert.equal(s.applyPage(page({ hasMore: true, continuation: 'aw==' })).continuation, 'aw==');
    assert.equal(s.applyPage(page()).continuation, null);
  });

  test('given feed events in order should emit them and advance the feed position', () => {
    const s = at(0, { c: 3 });
    const removed = feed(1, 'REMOVED', 'c');
    assert.deepEqual(s.applyFeedEvent(removed), [{ type: 'feed', data: removed }]);
    assert.equal(s.position.feedPosition, 1n);
    assert.equal(cursor(s, 'c'), undefined, 'REMOVED drops the cursor');
    assert.deepEqual(s.applyFeedEvent(removed), [], 'a duplicate');
  });

  test('given a feed ADDED event should need a sync', () => {
    const s = at(4);
    assert.equal(s.applyFeedEvent(feed(5, 'ADDED', 'g')).length, 1);
    assert.equal(s.needsSync, true);
  });

  test('given a live ADDED already applied by a sync should still need a sync', () => {
    const s = at(5, { g: 1 });
    s.beginPass();
    s.endPass();
    assert.deepEqual(s.applyFeedEvent(feed(5, 'ADDED', 'g')), [], 'a duplicate');
    assert.equal(s.needsSync, true, 'entries committed before the live subscription must be fetched');
  });

  test('given a removed conversation with a buffer should drop the buffer too', () => {
    const s = at(0, { c: 3 });
    s.applyMessage(msg('c', 5));
    s.applyFeedEvent(feed(1, 'REMOVED', 'c'));
    s.beginPass();
    const { events } = s.applyPage(page({ messages: [msg('c', 1)] }));
    assert.deepEqual(seqsOf(events, 'c'), [1], 're-added: starts over, no stale buffer');
  });

  test('given a feed gap should buffer, need a sync and release when a page fills it', () => {
    const s = at(2);
    assert.deepEqual(s.applyFeedEvent(feed(4, 'REMOVED', 'x')), []);
    assert.equal(s.needsSync, true);
    const { events } = s.applyPage(page({ feedEvents: [feed(3, 'REMOVED', 'y')], feedPosition: 3n }));
    assert.deepEqual(events.filter((e) => e.type === 'feed').map((e) => e.data.userSeq), [3n, 4n]);
    assert.equal(s.position.feedPosition, 4n);
  });

  test('given a page with an older feed position should keep the newer local one', () => {
    const s = at(6);
    s.applyPage(page({ feedPosition: 5n }));
    assert.equal(s.position.feedPosition, 6n);
    s.applyPage(page({ feedPosition: 9n }));
    assert.equal(s.position.feedPosition, 9n);
  });

  const ownSend = (conv, key, text) => ({ conversationId: conv, clientMsgId: key, content: { contentType: '', text } });
  const ack = (conv, seq, key, duplicate) => ({ conversationId: conv, seq: BigInt(seq), timestampMs: 77n, clientMsgId: key, duplicate });

  test('given an own ack in order should emit the message as sent by self', () => {
    const s = at(0, { c: 2 });
    const events = s.applyOwnAck('alice', ownSend('c', 'k1', 'hi'), ack('c', 3, 'k1', false));
    assert.deepEqual(events, [{
      type: 'message',
      data: { conversationId: 'c', seq: 3n, sender: 'alice', timestampMs: 77n, clientMsgId: 'k1', content: { contentType: '', text: 'hi' } },
    }]);
    assert.equal(cursor(s, 'c'), 3n);
  });

  test('given an own ack after missed messages should buffer it until a sync fills the gap', () => {
    const s = at(0, { c: 2 });
    assert.deepEqual(s.applyOwnAck('alice', ownSend('c', 'k', 'x'), ack('c', 5, 'k', false)), []);
    assert.equal(s.needsSync, true);
    const { events } = s.applyPage(page({ messages: [msg('c', 3), msg('c', 4), msg('c', 5)] }));
    assert.deepEqual(seqsOf(events, 'c'), [3, 4, 5]);
    assert.equal(events[2].data.sender, 'alice', 'the buffered own message, not the page copy');
  });

  test('given a duplicate ack already applied should emit nothing', () => {
    const s = at(0, { c: 5 });
    assert.deepEqual(s.applyOwnAck('alice', ownSend('c', 'k', 'x'), ack('c', 4, 'k', true)), []);
    assert.equal(s.needsSync, false);
  });

  test('given a duplicate ack beyond the cursor should sync instead of fabricating', () => {
    const s = at(0, { c: 3 });
    assert.deepEqual(s.applyOwnAck('alice', ownSend('c', 'k', 'x'), ack('c', 4, 'k', true)), []);
    assert.equal(s.needsSync, true);
  });

  test('given an expected seq not yet applied should need a sync', () => {
    const s = at(0, { c: 3 });
    s.expectSeq('c', 3n);
    assert.equal(s.needsSync, false);
    s.expectSeq('c', 4n);
    assert.equal(s.needsSync, true);
    s.beginPass();
    s.expectSeq('unknown', 1n);
    assert.equal(s.needsSync, true);
  });

  test('given a need raised during a pass should still need a sync after begin', () => {
    const s = at(0, { c: 1 });
    s.applyMessage(msg('c', 3));
    s.beginPass();
    assert.equal(s.needsSync, false);
    s.applyMessage(msg('c', 9));
    assert.equal(s.needsSync, true);
  });

  test('given a completed pass should drop the buffers of conversations without cursor', () => {
    const s = at(0);
    s.applyMessage(msg('stranger', 4));
    s.beginPass();
    s.applyPage(page());
    s.endPass();
    assert.deepEqual(seqsOf(s.applyPage(page({ messages: [msg('stranger', 5)] })).events, 'stranger'), [5], 'the stale 4 is gone');
  });

  test('given a position when resumed should keep the cursors sorted and the feed position', () => {
    const s = new SyncState({ feedPosition: '7', cursors: new Map([['b', 2n], ['a', 9]]) });
    assert.deepEqual(s.position, { feedPosition: 7n, cursors: new Map([['a', 9n], ['b', 2n]]) });
    assert.deepEqual(s.wirePosition(), { feedPosition: 7n, cursors: [{ conversationId: 'a', seq: 9n }, { conversationId: 'b', seq: 2n }] });
    assert.deepEqual(new SyncState(s.position).position, s.position);
    assert.deepEqual(new SyncState({ cursors: [{ conversationId: 'x', seq: '3' }] }).position.cursors, new Map([['x', 3n]]));
  });

  test('given an invalid position should throw a TypeError', () => {
    assert.throws(() => new SyncState({ feedPosition: -1 }), TypeError);
    assert.throws(() => new SyncState({ cursors: { c: 'x' } }), TypeError);
  });
});

describe('DeliveryTracker (automatic MarkDelivered)', () => {
  test('given a first message should be due at once and later ones when the window ends', () => {
    const d = new DeliveryTracker(true);
    d.emitted('c', 1n);
    assert.deepEqual(d.due(0), [['c', 1n]]);
    d.emitted('c', 2n);
    d.emitted('c', 3n);
    assert.deepEqual(d.due(499), [], 'still in the window');
    assert.equal(d.nextDue(), 500);
    assert.deepEqual(d.due(500), [['c', 3n]], 'the latest seq');
    assert.equal(d.nextDue(), null);
  });

  test('given a confirmed watermark should not send seqs at or below it', () => {
    const d = new DeliveryTracker(true);
    d.confirmed('c', 5n);
    d.emitted('c', 4n);
    d.emitted('c', 5n);
    assert.deepEqual(d.due(0), []);
    assert.equal(d.nextDue(), null);
    d.emitted('c', 6n);
    assert.deepEqual(d.due(0), [['c', 6n]]);
  });

  test('given a sent receipt should not send the same seq again after the window', () => {
    const d = new DeliveryTracker(true);
    d.emitted('c', 2n);
    assert.deepEqual(d.due(0), [['c', 2n]]);
    assert.deepEqual(d.due(2000), []);
  });

  test('given an unconfirmed receipt when the connection is lost should be due again', () => {
    const d = new DeliveryTracker(true);
    d.emitted('c', 2n);
    d.emitted('d', 7n);
    assert.deepEqual(d.due(0), [['c', 2n], ['d', 7n]]);
    d.confirmed('d', 7n);
    d.connectionLost();
    assert.deepEqual(d.due(500), [['c', 2n]], 'only the unconfirmed one');
  });

  test('given disabled or suspended tracking should never be due', () => {
    const off = new DeliveryTracker(false);
    off.emitted('c', 1n);
    assert.deepEqual(off.due(0), []);
    assert.equal(off.nextDue(), null);
    const d = new DeliveryTracker(true);
    d.suspend();
    d.emitted('c', 1n);
    assert.deepEqual(d.due(0), []);
    d.connectionLost();
    assert.deepEqual(d.due(0), [['c', 1n]], 'resumed on the next connection');
  });

  test('given a forgotten conversation should start over', () => {
    const d = new DeliveryTracker(true);
    d.emitted('c', 9n);
    d.due(0);
    d.forget('c');
    d.emitted('c', 1n);
    assert.deepEqual(d.due(0), [['c', 1n]]);
  });
});

describe('backoffDelay', () => {
  const policy = { baseMs: 200, capMs: 30_000 };

  test('given many draws should stay within zero and min(cap, base * 2^attempt)', () => {
    for (let attempt = 0; attempt < 40; attempt++) {
      const ceiling = Math.min(30_000, 200 * 2 ** attempt);
      for (let i = 0; i < 100; i++) {
        const d = backoffDelay(policy, attempt);
        assert.ok(d >= 0 && d <= ceiling, `attempt ${attempt}: ${d} > ${ceiling}`);
      }
    }
  });

  test('given many draws should use the whole range (full jitter)', () => {
    const draws = Array.from({ length: 1000 }, () => backoffDelay(policy, 10));
    assert.ok(draws.some((d) => d < 3000));
    assert.ok(draws.some((d) => d > 27_000));
  });

  test("given the server's retryAfterMs should wait at least that long", () => {
    for (let i = 0; i < 100; i++) assert.equal(backoffDelay(policy, 0, 5000), 5000);
  });
});
