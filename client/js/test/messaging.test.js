// Messaging against a real broker over a real WebSocket: direct conversations, groups,
// history paging and offline catch-up.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Switchboard } from '../switchboard.js';
import { delay, startBroker, uniqueUser } from './support/broker.js';
import { connectUser, logOf, range, seqs, untilMessages } from './support/clients.js';

describe('messaging with a real broker', () => {
  let broker;
  const clients = [];

  before(async () => {
    // Small sync pages: every resume and sync pass takes several pages (continuations).
    broker = await startBroker({ set: ['limits.max_sync_limit=4'] });
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

  test('given two users in a direct conversation when they exchange messages should each see the whole log in order exactly once', async () => {
    const alice = await connect(uniqueUser('alice'));
    const bob = await connect(uniqueUser('bob'));
    const dm = await alice.client.createDirect(bob.user);
    assert.equal(dm.kind, 'CONVERSATION_KIND_DIRECT');
    assert.equal(dm.conversationId, `dm:${[alice.user, bob.user].sort().join(':')}`);
    await untilMessages([alice.rec, bob.rec], dm.conversationId, 1);

    const sends = [];
    for (let i = 0; i < 10; i++) {
      sends.push(alice.client.send(dm.conversationId, `a${i}`));
      sends.push(bob.client.send(dm.conversationId, `b${i}`));
    }
    const acks = await Promise.all(sends);
    assert.ok(acks.every((a) => typeof a.seq === 'bigint' && !a.duplicate));
    await untilMessages([alice.rec, bob.rec], dm.conversationId, 21);
    await delay(100);

    const aliceLog = logOf(alice.rec, dm.conversationId);
    assert.deepEqual(aliceLog, logOf(bob.rec, dm.conversationId), 'both see the same log');
    assert.deepEqual(seqs(alice.rec, dm.conversationId), range(1, 21), 'gapless, in order, once');
    const textsBy = (user) => alice.rec.messages(dm.conversationId).filter((m) => m.sender === user && m.content).map((m) => m.content.text);
    assert.deepEqual(textsBy(alice.user), range(0, 9).map((i) => `a${i}`), "alice's sends in the order she sent them");
    assert.deepEqual(textsBy(bob.user), range(0, 9).map((i) => `b${i}`));
    assert.equal(alice.rec.messages(dm.conversationId)[0].system.created.kind, 'CONVERSATION_KIND_DIRECT');
    assert.equal(alice.client.position.cursors.get(dm.conversationId), 21n);
    assert.equal(bob.rec.of('feed')[0].kind, 'FEED_EVENT_KIND_ADDED');
  });

  test('given a group of three members when everyone sends should all see the same log in order', async () => {
    const [alice, bob, carol] = await Promise.all(['alice', 'bob', 'carol'].map((n) => connect(uniqueUser(n))));
    const group = await alice.client.createGroup('team', [bob.user, carol.user], { visibility: 'shared' });
    assert.equal(group.kind, 'CONVERSATION_KIND_GROUP');
    assert.equal(group.memberCount, 3);
    const id = group.conversationId;
    await untilMessages([alice.rec, bob.rec, carol.rec], id, 1);
    assert.equal(carol.rec.of('feed').find((f) => f.conversationId === id).conversationName, 'team');

    const sends = [];
    for (let i = 0; i < 5; i++) {
      for (const member of [alice, bob, carol]) sends.push(member.client.send(id, `${member.user}/${i}`));
    }
    await Promise.all(sends);
    await untilMessages([alice.rec, bob.rec, carol.rec], id, 16);
    await delay(100);
    const log = logOf(alice.rec, id);
    assert.deepEqual(logOf(bob.rec, id), log);
    assert.deepEqual(logOf(carol.rec, id), log);
    assert.deepEqual(seqs(carol.rec, id), range(1, 16));

    const members = await bob.client.listMembers(id);
    assert.deepEqual(members.members.map((m) => m.userId), [alice.user, bob.user, carol.user].sort());
    assert.equal(members.members.find((m) => m.userId === alice.user).role, 'ROLE_ADMIN');
    const list = await carol.client.listConversations();
    assert.equal(list.conversations.find((c) => c.conversationId === id).lastSeq, 16n);
  });

  test('given a long conversation when paging its history backwards and forwards should return every entry once, in order', async () => {
    const alice = await connect(uniqueUser('alice'));
    const dm = await alice.client.createDirect(uniqueUser('dave'));
    const id = dm.conversationId;
    await Promise.all(range(1, 25).map((i) => alice.client.send(id, `h${i}`)));
    await untilMessages([alice.rec], id, 26);
    const cursorBefore = alice.client.position.cursors.get(id);

    const backwards = [];
    let page = await alice.client.history(id, {}, 10);
    assert.equal(page.firstSeq, 1n);
    assert.equal(page.lastSeq, 26n);
    for (;;) {
      backwards.unshift(...page.messages.map((m) => Number(m.seq)));
      if (!page.hasMore) break;
      page = await alice.client.history(id, { before: page.messages[0].seq }, 10);
    }
    assert.deepEqual(backwards, range(1, 26));

    const forwards = [];
    page = await alice.client.history(id, { after: 0n }, 10);
    for (;;) {
      forwards.push(...page.messages.map((m) => Number(m.seq)));
      if (!page.hasMore) break;
      page = await alice.client.history(id, { after: page.messages.at(-1).seq }, 10);
    }
    assert.deepEqual(forwards, range(1, 26));
    const newest = await alice.client.history(id, {}, 3);
    assert.deepEqual(newest.messages.map((m) => m.content.text), ['h23', 'h24', 'h25']);
    assert.equal(cursorBefore, 26n);
    assert.equal(alice.client.position.cursors.get(id), cursorBefore, 'history does not move the cursor');
  });

  test('given a closed client when messages are sent meanwhile should a client resumed from the saved position receive exactly the missed ones once, over several sync pages', async () => {
    const alice = await connect(uniqueUser('alice'));
    const bobUser = uniqueUser('bob');
    const bob = await connect(bobUser);
    const dm = await alice.client.createDirect(bobUser);
    const id = dm.conversationId;
    await Promise.all([1, 2, 3].map((i) => alice.client.send(id, `before${i}`)));
    await untilMessages([bob.rec], id, 4);

    // Persist the position as an application would (JSON has no BigInt).
    const { feedPosition, cursors } = bob.client.position;
    const saved = JSON.stringify({ feedPosition: String(feedPosition), cursors: Object.fromEntries([...cursors].map(([c, s]) => [c, String(s)])) });
    await bob.client.close();

    for (let i = 1; i <= 10; i++) await alice.client.send(id, `missed${i}`);

    const again = await connect(bobUser, { position: JSON.parse(saved) });
    await untilMessages([again.rec], id, 10);
    await delay(300);
    assert.deepEqual(again.rec.messages(id).map((m) => m.content.text), range(1, 10).map((i) => `missed${i}`));
    assert.deepEqual(seqs(again.rec, id), range(5, 14));
    assert.equal(again.rec.of('feed').length, 0, 'the feed position was resumed too');
  });

  test('given an invalid token when connecting should reject with ERROR_CODE_UNAUTHENTICATED', async () => {
    await assert.rejects(
      Switchboard.connect({ url: broker.url, token: 'not-a-jwt' }),
      (e) => e.code === 'ERROR_CODE_UNAUTHENTICATED' && /token/.test(e.message),
    );
  });
});
