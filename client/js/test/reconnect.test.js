// Reconnecting against a real broker: sends in flight when the WebSocket dies (killed from the
// client side) or when the broker is killed and restarted on the same ports and data dir.
// Either way nothing is lost and nothing is duplicated.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import { delay, startBroker, uniqueUser } from './support/broker.js';
import { connectUser, logOf, range, seqs, trackingWebSocket, untilMessages } from './support/clients.js';

/** Asserts that `rec` saw the conversation's log 1..n with the user texts in `expected` order. */
function assertLog(rec, id, expected) {
  assert.deepEqual(seqs(rec, id), range(1, expected.length + 1), 'gapless, in order, exactly once');
  assert.deepEqual(rec.messages(id).slice(1).map((m) => m.content.text), expected);
}

/** The conversation's stored user messages, read with History (what the broker really has). */
async function storedTexts(client, id) {
  const page = await client.history(id, { after: 0n }, 200);
  assert.equal(page.hasMore, false);
  return page.messages.filter((m) => m.content).map((m) => m.content.text);
}

describe('reconnecting with a real broker', () => {
  const cleanups = [];
  after(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
  });

  test('given a short idle timeout when the client has nothing to send should its pings keep the session alive', async () => {
    const broker = await startBroker({ args: ['--heartbeat-interval-ms', '150', '--idle-timeout-ms', '500'] });
    cleanups.push(() => broker.stop());
    const alice = await connectUser(broker, uniqueUser('alice'));
    cleanups.push(() => alice.client.close());
    await delay(2_000);
    assert.deepEqual(alice.rec.events.map((e) => e.type), ['connected'], 'never disconnected');
    assert.ok((await alice.client.ping()) >= 0);
  });

  test('given sends in flight when the client-side WebSocket is killed should deliver every message exactly once, in order', async () => {
    const broker = await startBroker();
    cleanups.push(() => broker.stop());
    const tracking = trackingWebSocket();
    const alice = await connectUser(broker, uniqueUser('alice'), { WebSocket: tracking.WebSocket });
    const bob = await connectUser(broker, uniqueUser('bob'));
    cleanups.push(() => alice.client.close(), () => bob.client.close());
    const { conversationId: id } = await alice.client.createDirect(bob.user);
    await untilMessages([alice.rec, bob.rec], id, 1);

    const texts = range(0, 39).map((i) => `m${i}`);
    const acks = texts.slice(0, 20).map((t) => alice.client.send(id, t));
    await alice.rec.until((r) => r.messages(id).length >= 2, 10_000, 'the first ack');
    tracking.sockets.at(-1).close(); // the frames still in flight on this socket are lost
    acks.push(...texts.slice(20).map((t) => alice.client.send(id, t))); // issued while reconnecting
    const settled = await Promise.all(acks);

    await untilMessages([alice.rec, bob.rec], id, 41);
    await delay(300);
    assertLog(alice.rec, id, texts);
    assertLog(bob.rec, id, texts);
    assert.deepEqual(logOf(alice.rec, id), logOf(bob.rec, id));
    assert.deepEqual(await storedTexts(bob.client, id), texts, 'the broker stored each message once');
    assert.deepEqual(settled.map((a) => Number(a.seq)), range(2, 41));
    assert.equal(alice.rec.of('connected').length, 2, 'alice reconnected once');
    assert.equal(tracking.sockets.length, 2);
  });

  test('given sends in flight when the broker is killed and restarted on the same ports should lose nothing and duplicate nothing', async () => {
    const dataDir = mkdtempSync(path.join(tmpdir(), 'switchboard-js-restart-'));
    cleanups.push(() => rmSync(dataDir, { recursive: true, force: true }));
    const first = await startBroker({ dataDir, durability: 'sync' });
    let current = first;
    cleanups.push(() => current.stop());
    // Tokens come from the first broker; the restarted one uses the same secret (data dir).
    const broker = { url: first.url, token: first.token };
    const alice = await connectUser(broker, uniqueUser('alice'));
    const bob = await connectUser(broker, uniqueUser('bob'));
    cleanups.push(() => alice.client.close(), () => bob.client.close());
    const { conversationId: id } = await alice.client.createDirect(bob.user);
    await untilMessages([alice.rec, bob.rec], id, 1);

    const texts = range(0, 29).map((i) => `r${i}`);
    const tokens = { [alice.user]: await first.token(alice.user), [bob.user]: await first.token(bob.user) };
    broker.token = async (user) => tokens[user];
    const acks = texts.slice(0, 20).map((t) => alice.client.send(id, t));
    await alice.rec.until((r) => r.messages(id).length >= 2, 10_000, 'the first ack');
    await first.kill();
    acks.push(...texts.slice(20).map((t) => alice.client.send(id, t))); // issued while the broker is down
    await delay(200);
    current = await startBroker({ dataDir, durability: 'sync', listen: first.tcp, httpListen: first.http });

    const settled = await Promise.all(acks);
    await untilMessages([alice.rec, bob.rec], id, 31, 20_000);
    await delay(300);
    assertLog(alice.rec, id, texts);
    assertLog(bob.rec, id, texts);
    assert.deepEqual(await storedTexts(bob.client, id), texts, 'the broker stored each message once');
    assert.deepEqual(settled.map((a) => Number(a.seq)), range(2, 31));
    assert.ok(alice.rec.of('connected').length >= 2 && bob.rec.of('connected').length >= 2, 'both reconnected');
  });
});
