// The sign-in screen when the broker does not serve development tokens (a JWT secret is
// configured): it says so and accepts a pasted JWT.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';

import { launchBrowser, mintJwt, startBroker, text, tid, uniqueUser, waitConnected } from './harness.js';

const secret = randomBytes(24).toString('hex');
let broker;
let browser;

describe('sign-in without development tokens', () => {
  before(async () => {
    broker = await startBroker({ extraArgs: ['--jwt-secret', secret] });
    browser = await launchBrowser();
  }, { timeout: 60_000 });

  after(async () => {
    await browser?.close().catch(() => {});
    await broker?.stop();
  }, { timeout: 30_000 });

  it('says that development tokens are off and signs in with a pasted JWT instead', { timeout: 60_000 }, async () => {
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      await page.goto(broker.baseUrl);
      const user = uniqueUser('dana');
      await tid(page, 'signin-name').fill(user);
      await tid(page, 'signin-submit').click();
      await tid(page, 'signin-error').waitFor({ state: 'visible' });
      assert.match(await text(page, 'signin-error'), /Development tokens are off/);
      assert.equal(await tid(page, 'signin-jwt').getAttribute('open'), '');

      // A token signed with another secret is refused, and the page says so.
      await tid(page, 'signin-token').fill(mintJwt('not-the-secret', user));
      await tid(page, 'signin-token-submit').click();
      await tid(page, 'signin').waitFor({ state: 'visible' });
      await page.waitForFunction(() => /refused the token/.test(document.querySelector('[data-testid="signin-error"]').textContent));

      await tid(page, 'signin-token').fill(mintJwt(secret, user));
      await tid(page, 'signin-token-submit').click();
      await waitConnected(page);
      assert.equal(await text(page, 'current-user'), user);
      // A reload keeps the pasted token.
      await page.reload();
      await waitConnected(page);
      assert.equal(await text(page, 'current-user'), user);
    } finally {
      await ctx.close().catch(() => {});
    }
  });
});
