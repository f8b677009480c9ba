// The client's connection logic against a scripted broker (an in-memory fake WebSocket): the
// handshake, request/reply matching, the client rule on live frames, resends after a
// reconnect, limits, delivery receipts, presence renewal.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { Switchboard, SwitchboardError } from '../switchboard.js';
import { Recorder, delay } from './support/broker.js';
import { FakeNet, welcome, wireMessage } from './support/fake-websocket.js';

/** A client connected to a fake broker; listeners are registered right after connect. */
async function connect(options = {}, welcomeFields = {}) {
  const net = new FakeNet();
  const connecting = Switchboard.connect({
    url: 'ws://broker.test/ws',
    token: 'tok',
    WebSocket: net.WebSocket,
    reconnect: { baseMs: 1, capMs: 10 },
    autoDeliveryReceipts: false,
    ...options,
  });
  const peer = await net.accept();
  const hello = await peer.accept(welcomeFields);
  const client = await connecting;
  const rec = new Recorder(client);
  await rec.until((r) => r.of('connected').length === 1, 1000, 'connected');
  return { net, peer, client, rec, hello };
}

const texts = (rec, conv) => rec.messages(conv).map((m) => `${m.seq}:${m.content?.text ?? '<system>'}`);

describe('Switchboard over a scripted broker', () => {
  test('given a new client when connecting should send Hello with version 1, the token and an empty resume position', async () => {
    const { peer, client, hello } = await connect();
    assert.equal(peer.protocol, 'switchboard.v1.json');
    assert.equal(hello.requestId, '1');
    assert.equal(hello.hello.protocolVersion, 1);
    assert.equal(hello.hello.token, 'tok');
    assert.deepEqual(hello.hello.resume, { feedPosition: '0', cursors: [] });
    assert.equal(client.userId, 'alice');
    assert.equal(client.sessionId, 's1');
    await client.close();
  });

  test('given a Welcome with a resumed page should emit connected, then the feed and messages in order, to listeners registered after connect', async () => {
    const feedEvent = { userSeq: '1', kind: 'FEED_EVENT_KIND_ADDED', conversationId: 'c', conversationSeq: '1', actor: 'bob' };
    const resumed = { feedEvents: [feedEvent], feedPosition: '1', messages: [wireMessage('c', 1), wireMessage('c', 2)] };
    const { client, rec } = await connect({}, { resumed });
    await rec.until((r) => r.messages().length === 2);
    assert.deepEqual(rec.events.map((e) => e.type), ['connected', 'feed', 'message', 'message']);
    assert.deepEqual(rec.of('connected')[0], { userId: 'alice', sessionId: 's1', reconnect: false });
    const [first] = rec.messages('c');
    assert.equal(first.seq, 1n);
    assert.equal(first.timestampMs, 1001n);
    assert.deepEqual(first.content, { contentType: '', text: 'm1' });
    assert.equal(rec.of('feed')[0].userSeq, 1n);
    assert.equal(rec.of('feed')[0].conversationKind, 'CONVERSATION_KIND_UNSPECIFIED', 'absent enums read as UNSPECIFIED');
    assert.deepEqual(client.position, { feedPosition: 1n, cursors: new Map([['c', 2n]]) });
    await client.close();
  });

  test('given a resumed page with more should continue the pass with its continuation and the updated position', async () => {
    const resumed = { messages: [wireMessage('c', 1)], hasMore: true, continuation: 'YWJj' };
    const { peer, client, rec } = await connect({}, { resumed });
    const sync = await peer.recv();
    assert.deepEqual(sync.sync, { position: { feedPosition: '0', cursors: [{ conversationId: 'c', seq: '1' }] }, continuation: 'YWJj' });
    peer.reply(sync.requestId, 'sync', { messages: [wireMessage('c', 2)] });
    await rec.until((r) => r.messages().length === 2);
    assert.deepEqual(texts(rec, 'c'), ['1:m1', '2:m2']);
    await client.close();
  });

  test('given a gap in live messages should sync and deliver every entry exactly once in order', async () => {
    const { peer, client, rec } = await connect({ position: { cursors: { c: 1n } } });
    peer.push('message', wireMessage('c', 3));
    const sync = await peer.recv();
    assert.deepEqual(sync.sync.position.cursors, [{ conversationId: 'c', seq: '1' }]);
    assert.equal(sync.sync.continuation, undefined, 'a new pass');
    peer.reply(sync.requestId, 'sync', { messages: [wireMessage('c', 2), wireMessage('c', 3)] });
    await rec.until((r) => r.messages().length === 2);
    peer.push('message', wireMessage('c', 3));
    peer.push('message', wireMessage('c', 4));
    await rec.until((r) => r.messages().length === 3);
    assert.deepEqual(texts(rec, 'c'), ['2:m2', '3:m3', '4:m4']);
    await client.close();
  });

  test('given an own send should resolve with the ack and emit the message built from it; a duplicate ack should emit nothing', async () => {
    const { peer, client, rec } = await connect({ position: { cursors: { c: 1 } } });
    const sending = client.send('c', 'hi');
    const frame = await peer.recv();
    assert.match(frame.send.clientMsgId, /^[0-9a-f]{32}$/);
    assert.deepEqual(frame.send.content, { contentType: '', text: 'hi' });
    peer.reply(frame.requestId, 'sendAck', { conversationId: 'c', seq: '2', timestampMs: '5', clientMsgId: frame.send.clientMsgId });
    const ack = await sending;
    assert.equal(ack.seq, 2n);
    assert.equal(ack.duplicate, false);
    assert.deepEqual(rec.messages('c'), [{ conversationId: 'c', seq: 2n, sender: 'alice', timestampMs: 5n, clientMsgId: frame.send.clientMsgId, content: { contentType: '', text: 'hi' } }]);

    const again = client.send('c', 'other text', { clientMsgId: frame.send.clientMsgId });
    const repeat = await peer.recv();
    assert.equal(repeat.send.clientMsgId, frame.send.clientMsgId);
    peer.reply(repeat.requestId, 'sendAck', { conversationId: 'c', seq: '2', timestampMs: '5', clientMsgId: frame.send.clientMsgId, duplicate: true });
    assert.equal((await again).duplicate, true);
    await delay(20);
    assert.equal(rec.messages().length, 1);
    assert.deepEqual(peer.pending(), [], 'no sync for an applied duplicate');
    await client.close();
  });

  test('given binary content should send it as base64 and emit it as a Uint8Array', async () => {
    const { peer, client, rec } = await connect({ position: { cursors: { c: 0 } } });
    const sending = client.send('c', { contentType: 'image/png', data: new Uint8Array([1, 2, 3]) });
    const frame = await peer.recv();
    assert.deepEqual(frame.send.content, { contentType: 'image/png', data: 'AQID' });
    peer.reply(frame.requestId, 'sendAck', { conversationId: 'c', seq: '1', timestampMs: '5', clientMsgId: frame.send.clientMsgId });
    await sending;
    peer.push('message', { ...wireMessage('c', 2), content: { contentType: 'image/png', data: 'BAU=' } });
    await rec.until((r) => r.messages().length === 2);
    assert.deepEqual(rec.messages().map((m) => [...m.content.data]), [[1, 2, 3], [4, 5]]);
    await client.close();
  });

  test('given unanswered sends when the connection drops should re-send them with the same clientMsgId after the resume pass', async () => {
    const { net, peer, client, rec } = await connect({ position: { cursors: { c: 1 } } });
    const first = client.send('c', 'one');
    const second = client.send('c', 'two');
    const [f1, f2] = [await peer.recv(), await peer.recv()];
    peer.close();
    const next = await net.accept();
    const hello = await next.recv();
    assert.deepEqual(hello.hello.resume, { feedPosition: '0', cursors: [{ conversationId: 'c', seq: '1' }] });
    // The broker had stored the first send: the resumed page carries it.
    const stored = { ...wireMessage('c', 2, 'one', 'alice'), clientMsgId: f1.send.clientMsgId };
    next.reply(hello.requestId, 'welcome', welcome({ resumed: { messages: [stored], hasMore: true, continuation: 'eA==' } }));
    const sync = await next.recv();
    assert.ok(sync.sync, 'the resume pass goes on before any send');
    next.reply(sync.requestId, 'sync', {});
    const [r1, r2] = [await next.recv(), await next.recv()];
    assert.deepEqual([r1.send.clientMsgId, r2.send.clientMsgId], [f1.send.clientMsgId, f2.send.clientMsgId]);
    next.reply(r1.requestId, 'sendAck', { conversationId: 'c', seq: '2', timestampMs: '5', clientMsgId: r1.send.clientMsgId, duplicate: true });
    next.reply(r2.requestId, 'sendAck', { conversationId: 'c', seq: '3', timestampMs: '6', clientMsgId: r2.send.clientMsgId });
    assert.equal((await first).duplicate, true);
    assert.equal((await second).seq, 3n);
    assert.deepEqual(texts(rec, 'c'), ['2:one', '3:two']);
    assert.deepEqual(rec.of('connected').map((c) => c.reconnect), [false, true]);
    assert.equal(rec.of('disconnected').length, 1);
    await client.close();
  });

  test('given maxInflight 2 should keep at most two requests unanswered', async () => {
    const { peer, client } = await connect({}, { limits: { maxInflight: 2, maxFrameBytes: 1048576 } });
    const replies = Array.from({ length: 5 }, (_, i) => client.presence([`u${i}`]));
    const a = await peer.recv();
    const b = await peer.recv();
    await delay(20);
    assert.deepEqual(peer.pending(), [], 'the third waits for a free slot');
    peer.reply(a.requestId, 'presences', { presences: [{ userId: 'u0' }] });
    const c = await peer.recv();
    assert.deepEqual(c.presenceQuery.users, ['u2']);
    for (const f of [b, c]) peer.reply(f.requestId, 'presences', { presences: [{ userId: f.presenceQuery.users[0] }] });
    const d = await peer.recv();
    const e = await peer.recv();
    for (const f of [d, e]) peer.reply(f.requestId, 'presences', { presences: [{ userId: f.presenceQuery.users[0], online: true }] });
    const all = await Promise.all(replies);
    assert.deepEqual(all.map((list) => list[0].userId), ['u0', 'u1', 'u2', 'u3', 'u4']);
    assert.deepEqual(all[0][0], { userId: 'u0', online: false, devices: 0, lastSeenMs: 0n });
    await client.close();
  });

  test('given a RATE_LIMITED send should retry after retryAfterMs with the same clientMsgId three times, then reject', async () => {
    const { peer, client } = await connect({ position: { cursors: { c: 0 } } });
    const sending = client.send('c', 'x');
    let last = await peer.recv();
    const key = last.send.clientMsgId;
    for (let attempt = 0; attempt < 3; attempt++) {
      const rejectedAt = performance.now();
      peer.reply(last.requestId, 'error', { code: 'ERROR_CODE_RATE_LIMITED', message: 'slow down', retryAfterMs: '80' });
      last = await peer.recv();
      assert.ok(performance.now() - rejectedAt >= 75, 'waited retryAfterMs');
      assert.equal(last.send.clientMsgId, key);
    }
    peer.reply(last.requestId, 'error', { code: 'ERROR_CODE_RATE_LIMITED', message: 'slow down', retryAfterMs: '80' });
    await assert.rejects(sending, (e) => e instanceof SwitchboardError && e.code === 'ERROR_CODE_RATE_LIMITED' && e.retryAfterMs === 80);
    await client.close();
  });

  test('given a send larger than the broker accepts should reject it with FRAME_TOO_LARGE without sending it', async () => {
    const { peer, client } = await connect({ position: { cursors: { c: 0 } } }, { limits: { maxFrameBytes: 65536, maxInflight: 256 } });
    await assert.rejects(client.send('c', 'x'.repeat(100_000)), { code: 'FRAME_TOO_LARGE' });
    const ok = client.send('c', 'small');
    const frame = await peer.recv();
    assert.equal(frame.send.content.text, 'small', 'the oversized frame was never written');
    peer.reply(frame.requestId, 'sendAck', { conversationId: 'c', seq: '1', timestampMs: '1', clientMsgId: frame.send.clientMsgId });
    await ok;
    await client.close();
  });

  test('given an accepted refreshToken should resolve with the new expiry and reconnect with the new token', async () => {
    const { net, peer, client, rec } = await connect();
    const refreshing = client.refreshToken('tok2');
    const frame = await peer.recv();
    assert.deepEqual(frame.refreshToken, { token: 'tok2' });
    peer.reply(frame.requestId, 'refreshTokenOk', { expiresAtMs: '1700000000000' });
    assert.equal(await refreshing, 1700000000000n);
    peer.push('disconnect', { reason: 'DISCONNECT_REASON_TOKEN_EXPIRED', message: 'expired' });
    peer.close();
    const again = await net.accept();
    const hello = await again.accept();
    assert.equal(hello.hello.token, 'tok2', 'reconnects use the refreshed token');
    await rec.until((r) => r.of('connected').length === 2, 1000, 'reconnected');
    assert.equal(rec.of('disconnected')[0].reason, 'DISCONNECT_REASON_TOKEN_EXPIRED');
    await client.close();
  });

  test('given a refused refreshToken should reject with the code and reason and keep the old token', async () => {
    const { net, peer, client, rec } = await connect();
    const refreshing = client.refreshToken('bobs-token');
    const frame = await peer.recv();
    peer.reply(frame.requestId, 'error', { code: 'ERROR_CODE_FORBIDDEN', message: 'another user', reason: 'subject_mismatch' });
    await assert.rejects(refreshing, { code: 'ERROR_CODE_FORBIDDEN', reason: 'subject_mismatch' });
    peer.close();
    const again = await net.accept();
    assert.equal((await again.accept()).hello.token, 'tok');
    await rec.until((r) => r.of('connected').length === 2, 1000, 'reconnected');
    await client.close();
  });

  test('given a rate-limited typing update should reject it without retrying', async () => {
    const { peer, client } = await connect();
    const typing = client.typing('c', true);
    const frame = await peer.recv();
    assert.deepEqual(frame.typing, { conversationId: 'c', active: true });
    peer.reply(frame.requestId, 'error', { code: 'ERROR_CODE_RATE_LIMITED', retryAfterMs: '10' });
    await assert.rejects(typing, { code: 'ERROR_CODE_RATE_LIMITED' });
    await delay(100);
    assert.deepEqual(peer.pending(), []);
    await client.close();
  });

  test('given messages handed to the application should send MarkDelivered at once, then once for the latest seq when the 500 ms window ends', async () => {
    const { peer, client, rec } = await connect({ autoDeliveryReceipts: true, position: { cursors: { c: 0 } } });
    peer.push('message', wireMessage('c', 1));
    const m1 = await peer.recv();
    const start = performance.now();
    assert.deepEqual(m1.markDelivered, { conversationId: 'c', seq: '1' });
    peer.reply(m1.requestId, 'receipt', { conversationId: 'c', userId: 'alice', deliveredSeq: '1' });
    peer.push('message', wireMessage('c', 2));
    peer.push('message', wireMessage('c', 3));
    const m3 = await peer.recv(2000);
    assert.ok(performance.now() - start >= 450, 'coalesced until the window ended');
    assert.deepEqual(m3.markDelivered, { conversationId: 'c', seq: '3' });
    peer.reply(m3.requestId, 'receipt', { conversationId: 'c', userId: 'alice', deliveredSeq: '3' });
    // An already acknowledged seq (e.g. from another device) is never sent.
    peer.push('receiptEvent', { conversationId: 'c', userId: 'alice', deliveredSeq: '4', readSeq: '4' });
    peer.push('message', wireMessage('c', 4));
    await rec.until((r) => r.messages().length === 4);
    await delay(700);
    assert.deepEqual(peer.pending(), []);
    await client.close();
  });

  test('given autoDeliveryReceipts false should never send MarkDelivered', async () => {
    const { peer, client, rec } = await connect({ position: { cursors: { c: 0 } } });
    peer.push('message', wireMessage('c', 1));
    await rec.until((r) => r.messages().length === 1);
    await delay(50);
    assert.deepEqual(peer.pending(), []);
    await client.close();
  });

  test('given presence subscriptions when reconnected should renew them after the resume pass and emit the fresh presence', async () => {
    const { net, peer, client, rec } = await connect();
    const subscribing = client.subscribePresence(['bob', 'carol']);
    const sub = await peer.recv();
    peer.reply(sub.requestId, 'presences', { presences: [{ userId: 'bob' }, { userId: 'carol' }] });
    assert.equal((await subscribing).length, 2);
    const unsubscribing = client.unsubscribePresence(['carol']);
    const unsub = await peer.recv();
    assert.deepEqual(unsub.presenceUnsubscribe, { users: ['carol'] });
    peer.reply(unsub.requestId, 'ack', {});
    await unsubscribing;
    peer.close();
    const next = await net.accept();
    await next.accept();
    const renewal = await next.recv();
    assert.deepEqual(renewal.presenceSubscribe, { users: ['bob'] });
    next.reply(renewal.requestId, 'presences', { presences: [{ userId: 'bob', online: true, devices: 1, lastSeenMs: '9' }] });
    await rec.until((r) => r.of('presence').length === 1);
    assert.deepEqual(rec.of('presence'), [{ userId: 'bob', online: true, devices: 1, lastSeenMs: 9n }]);
    await client.close();
  });

  test('given a Disconnect with retryAfterMs should report it and reconnect no earlier than that', async () => {
    const { net, peer, client, rec } = await connect();
    const start = performance.now();
    peer.push('disconnect', { reason: 'DISCONNECT_REASON_SHUTDOWN', message: 'bye', retryAfterMs: '300' });
    const next = await net.accept();
    assert.ok(performance.now() - start >= 290, 'waited retryAfterMs');
    assert.deepEqual(rec.of('disconnected'), [{ reason: 'DISCONNECT_REASON_SHUTDOWN', message: 'bye', retryAfterMs: 300 }]);
    await next.accept();
    await rec.until((r) => r.of('connected').length === 2);
    await client.close();
  });

  test('given the connection is down should reject requests with CONNECTION_LOST and hold sends until reconnected', async () => {
    const { net, peer, client, rec } = await connect({ position: { cursors: { c: 0 } } });
    net.refuse = true;
    peer.close();
    await rec.until((r) => r.of('disconnected').length === 1);
    assert.equal(client.connected, false);
    await assert.rejects(client.presence(['bob']), { code: 'CONNECTION_LOST' });
    await client.unsubscribePresence(['bob']);
    const sending = client.send('c', 'later');
    await delay(30);
    net.refuse = false;
    const next = await net.accept();
    await next.accept();
    const frame = await next.recv();
    assert.equal(frame.send.content.text, 'later');
    next.reply(frame.requestId, 'sendAck', { conversationId: 'c', seq: '1', timestampMs: '1', clientMsgId: frame.send.clientMsgId });
    assert.equal((await sending).seq, 1n);
    await client.close();
  });

  test('given a WebSocket that reports a failed connection with error and no close should retry promptly', async () => {
    const { net, peer, client, rec } = await connect();
    net.refuse = 'error-only';
    peer.close();
    await rec.until((r) => r.of('disconnected').length === 1);
    while (net.opened < 4) await delay(5);
    net.refuse = false;
    const start = performance.now();
    const next = await net.accept();
    assert.ok(performance.now() - start < 1000, 'no attempt hangs until the connect timeout');
    await next.accept();
    await rec.until((r) => r.of('connected').length === 2);
    await client.close();
  });

  test('given typing events should emit only those of other users', async () => {
    const { peer, client, rec } = await connect();
    peer.push('typing', { conversationId: 'c', userId: 'alice', active: true, expiresInMs: 5000 });
    peer.push('typing', { conversationId: 'c', userId: 'bob', active: true, expiresInMs: 5000 });
    await rec.until((r) => r.of('typing').length === 1);
    await delay(10);
    assert.deepEqual(rec.of('typing'), [{ conversationId: 'c', userId: 'bob', active: true, expiresInMs: 5000 }]);
    await client.close();
  });

  test('given a reply to an unknown request should treat it as a protocol violation and reconnect', async () => {
    const { net, peer, client, rec } = await connect();
    peer.reply('999', 'pong', {});
    const next = await net.accept();
    assert.match(rec.of('disconnected')[0].message, /protocol violation/);
    await next.accept();
    await rec.until((r) => r.of('connected').length === 2);
    await client.close();
  });

  test('given a Conversation reply above the cursor should sync and start the cursor from the page', async () => {
    const { peer, client, rec } = await connect();
    const creating = client.createDirect('bob');
    const create = await peer.recv();
    assert.deepEqual(create.createConversation, { kind: 'CONVERSATION_KIND_DIRECT', members: ['bob'] });
    peer.reply(create.requestId, 'conversation', { conversationId: 'dm:alice:bob', kind: 'CONVERSATION_KIND_DIRECT', lastSeq: '1', created: true });
    const conversation = await creating;
    assert.equal(conversation.lastSeq, 1n);
    assert.equal(conversation.visibility, 'HISTORY_VISIBILITY_UNSPECIFIED');
    const sync = await peer.recv();
    const created = { conversationId: 'dm:alice:bob', seq: '1', sender: 'alice', system: { created: { kind: 'CONVERSATION_KIND_DIRECT', members: ['alice', 'bob'] } } };
    peer.reply(sync.requestId, 'sync', { messages: [created] });
    await rec.until((r) => r.messages().length === 1);
    assert.deepEqual(rec.messages()[0].system.created.members, ['alice', 'bob']);
    assert.equal(client.position.cursors.get('dm:alice:bob'), 1n);
    await client.close();
  });

  test('given a token rejected at reconnect with a static token should stop and emit closed with the error', async () => {
    const { net, peer, client, rec } = await connect({ position: { cursors: { c: 0 } } });
    const sending = client.send('c', 'never');
    await peer.recv();
    peer.close();
    const next = await net.accept();
    const hello = await next.recv();
    next.reply(hello.requestId, 'error', { code: 'ERROR_CODE_UNAUTHENTICATED', message: 'token expired' });
    next.push('disconnect', { reason: 'DISCONNECT_REASON_AUTH_FAILED' });
    await rec.until((r) => r.of('closed').length === 1);
    assert.equal(rec.of('closed')[0].error.code, 'ERROR_CODE_UNAUTHENTICATED');
    await assert.rejects(sending, { code: 'CLOSED' });
    await assert.rejects(client.ping(), { code: 'CLOSED' });
  });

  test('given a token provider should ask it for a token on every connection attempt', async () => {
    let calls = 0;
    const { net, peer, client, rec, hello } = await connect({ token: undefined, tokenProvider: async () => `t${++calls}` });
    assert.equal(hello.hello.token, 't1');
    peer.close();
    const next = await net.accept();
    assert.equal((await next.accept()).hello.token, 't2');
    await rec.until((r) => r.of('connected').length === 2);
    await client.close();
  });

  test('given close should reject unanswered requests with CLOSED and emit closed once', async () => {
    const { peer, client, rec } = await connect();
    const pinging = client.ping();
    await peer.recvRaw();
    await client.close();
    await client.close();
    await assert.rejects(pinging, { code: 'CLOSED' });
    assert.equal(rec.of('closed').length, 1);
    assert.equal(rec.of('disconnected').length, 0);
    await delay(10);
    assert.equal(peer.closedByClient, true);
  });

  test('given a silent broker should ping every heartbeat and reconnect once the connection looks dead', async () => {
    const { net, peer, client, rec } = await connect({}, { heartbeatIntervalMs: 40, idleTimeoutMs: 100 });
    const ping = await peer.recvRaw();
    assert.deepEqual(ping.ping, {});
    // No Pong: the client keeps at most one ping outstanding and gives up after 100 ms.
    const next = await net.accept();
    assert.match(rec.of('disconnected')[0].message, /no frame from the broker/);
    await next.accept();
    await rec.until((r) => r.of('connected').length === 2);
    await client.close();
  });

  test('given reconnect false when the connection drops should reject the sends and close', async () => {
    const { peer, client, rec } = await connect({ reconnect: false, position: { cursors: { c: 0 } } });
    const sending = client.send('c', 'x');
    await peer.recv();
    peer.close();
    await assert.rejects(sending, { code: 'CONNECTION_LOST' });
    await rec.until((r) => r.of('closed').length === 1);
    assert.deepEqual(rec.events.map((e) => e.type), ['connected', 'disconnected', 'closed']);
  });
});
