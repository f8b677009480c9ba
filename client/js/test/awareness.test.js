// Receipts, typing and presence against a real broker (presence grace period 200 ms).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { startBroker, uniqueUser } from './support/broker.js';
import { connectUser, untilMessages } from './support/clients.js';

describe('receipts, typing and presence with a real broker', () => {
  let broker;
  const clients = [];

  before(async () => {
    broker = await startBroker({ set: ['presence.grace_ms=200'] });
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.client.close()));
    await broker?.stop();
  });

  async function connect(name, options) {
    const c = await connectUser(broker, name, options);
    clients.push(c);
    return c;
  }

  async function directPair() {
    const alice = await connect(uniqueUser('alice'));
    const bob = await connect(uniqueUser('bob'));
    const { conversationId: id } = await alice.client.createDirect(bob.user);
    await untilMessages([alice.rec, bob.rec], id, 1);
    return { alice, bob, id };
  }

  test('given automatic delivery receipts when bob receives a message should alice get his delivered receipt, and his markRead should reach her', async () => {
    const { alice, bob, id } = await directPair();
    const ack = await alice.client.send(id, 'did you get this?');
    await untilMessages([bob.rec], id, 2);

    const delivered = await alice.rec.until(
      (r) => r.of('receipt').find((x) => x.userId === bob.user && x.deliveredSeq >= ack.seq),
      5_000,
      "bob's delivered receipt",
    );
    assert.equal(delivered.conversationId, id);

    const own = await bob.client.markRead(id, ack.seq);
    assert.deepEqual(own, { conversationId: id, userId: bob.user, deliveredSeq: ack.seq, readSeq: ack.seq });
    const read = await alice.rec.until(
      (r) => r.of('receipt').find((x) => x.userId === bob.user && x.readSeq >= ack.seq),
      5_000,
      "bob's read receipt",
    );
    assert.equal(read.deliveredSeq >= ack.seq, true);

    const list = await alice.client.receipts(id);
    assert.equal(list.conversationId, id);
    const bobs = list.receipts.find((r) => r.userId === bob.user);
    assert.equal(bobs.readSeq, ack.seq);
    assert.equal(list.receipts.find((r) => r.userId === alice.user).readSeq, ack.seq, 'own send marks read');
  });

  test('given automatic delivery receipts switched off should send no MarkDelivered', async () => {
    const alice = await connect(uniqueUser('alice'));
    const bob = await connect(uniqueUser('bob'), { autoDeliveryReceipts: false });
    const { conversationId: id } = await alice.client.createDirect(bob.user);
    const ack = await alice.client.send(id, 'quiet');
    await untilMessages([bob.rec], id, 2);
    await new Promise((r) => setTimeout(r, 700));
    const bobs = (await alice.client.receipts(id)).receipts.find((r) => r.userId === bob.user);
    assert.equal(bobs.deliveredSeq, 0n);
    assert.equal(alice.rec.of('receipt').length, 0);
    assert.ok(ack.seq > 0n);
  });

  test('given bob typing should alice receive the typing event and bob none of his own', async () => {
    const { alice, bob, id } = await directPair();
    await bob.client.typing(id, true);
    const typing = await alice.rec.until((r) => r.of('typing')[0], 5_000, 'typing');
    assert.equal(typing.conversationId, id);
    assert.equal(typing.userId, bob.user);
    assert.equal(typing.active, true);
    assert.ok(typing.expiresInMs > 0);
    await bob.client.typing(id, false);
    await alice.rec.until((r) => r.of('typing').some((t) => t.active === false), 5_000, 'typing stopped');
    assert.equal(bob.rec.of('typing').length, 0);
  });

  test('given a direct peer going offline and online should alice receive presence events', async () => {
    const alice = await connect(uniqueUser('alice'));
    const bobUser = uniqueUser('bob');
    const bob = await connect(bobUser);
    const { conversationId: id } = await alice.client.createDirect(bobUser);
    await untilMessages([alice.rec], id, 1);
    const [now] = await alice.client.presence([bobUser]);
    assert.equal(now.online, true);
    assert.equal(now.devices, 1);

    await bob.client.close();
    const offline = await alice.rec.until(
      (r) => r.of('presence').find((p) => p.userId === bobUser && !p.online), 5_000, 'bob offline');
    assert.ok(offline.lastSeenMs > 0n);

    await connect(bobUser);
    const online = await alice.rec.until(
      (r) => r.of('presence').find((p) => p.userId === bobUser && p.online), 5_000, 'bob online');
    assert.equal(online.devices, 1);
  });

  test('given a presence subscription should alice receive the subscribed user coming online and going offline', async () => {
    const alice = await connect(uniqueUser('alice'));
    const carolUser = uniqueUser('carol');
    const [initial] = await alice.client.subscribePresence([carolUser]);
    assert.deepEqual(initial, { userId: carolUser, online: false, devices: 0, lastSeenMs: 0n });
    const carol = await connect(carolUser);
    await alice.rec.until((r) => r.of('presence').find((p) => p.userId === carolUser && p.online), 5_000, 'carol online');
    await alice.client.unsubscribePresence([carolUser]);
    await carol.client.close();
    await new Promise((r) => setTimeout(r, 600));
    assert.equal(alice.rec.of('presence').filter((p) => p.userId === carolUser && !p.online).length, 0, 'unsubscribed');
  });
});
