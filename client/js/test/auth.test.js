// Token refresh against a real broker: the welcome announces the token's expiry, a token of the
// same user moves it, another user's token is refused with a typed reason.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { startBroker, uniqueUser } from './support/broker.js';
import { connectUser } from './support/clients.js';

describe('token refresh with a real broker', () => {
  let broker;
  const clients = [];

  before(async () => {
    broker = await startBroker();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.client.close()));
    await broker?.stop();
  });

  test('given a token of the same user should refreshToken resolve with its expiry and keep the session', async () => {
    const alice = await connectUser(broker, uniqueUser('alice'));
    clients.push(alice);
    const expiresAtMs = await alice.client.refreshToken(await broker.token(alice.user));
    assert.equal(typeof expiresAtMs, 'bigint');
    assert.ok(expiresAtMs > BigInt(Date.now()), `${expiresAtMs} is in the future`);
    assert.ok((await alice.client.ping()) >= 0);
  });

  test('given another user\'s token or garbage should refreshToken reject with the code and reason', async () => {
    const alice = await connectUser(broker, uniqueUser('alice'));
    clients.push(alice);
    await assert.rejects(alice.client.refreshToken(await broker.token(uniqueUser('bob'))), {
      code: 'ERROR_CODE_FORBIDDEN', reason: 'subject_mismatch',
    });
    await assert.rejects(alice.client.refreshToken('not a token'), {
      code: 'ERROR_CODE_UNAUTHENTICATED', reason: 'malformed',
    });
    assert.ok((await alice.client.ping()) >= 0, 'the session goes on');
    assert.deepEqual(alice.rec.events.map((e) => e.type), ['connected']);
  });
});
