// End-to-end tests of the demo chat page in a real Chromium against a real broker process.
//
// One broker and one browser serve every test of this file (users are unique per test);
// each test opens its own browser contexts (one per user, like separate people) and closes
// them whatever happens. On a failure, screenshots of the test's pages are saved to
// test-artifacts/failures/ and the pages' console errors are printed.
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import {
  artifactsDir, assertOrdered, directId, ensureArtifactsDir, eventually, launchBrowser, messages,
  openConversation, rows, send, signIn, startBroker, startDirect, text, tid, uniqueUser,
  waitConnected, waitForMessage, waitForReceipt,
} from './harness.js';

const TEST_TIMEOUT_MS = 120_000;

let broker;
let browser;

/**
 * Runs a test body with a `scenario` that creates signed-in users (each in its own browser
 * context) and cleans up after it, saving screenshots when the body fails.
 */
function scenario(name, body) {
  return async () => {
    const contexts = [];
    const users = [];
    const s = {
      /** A new person: own context (cookies, sessionStorage), signed in as a fresh user. */
      async user(prefix, { viewport = { width: 1000, height: 700 }, trackSockets = false } = {}) {
        const ctx = await browser.newContext({ viewport });
        contexts.push(ctx);
        if (trackSockets) {
          // Lets the test drop the page's WebSocket connections (window.__testSockets).
          await ctx.addInitScript(() => {
            const Native = window.WebSocket;
            window.__testSockets = [];
            window.WebSocket = class extends Native {
              constructor(...args) {
                super(...args);
                window.__testSockets.push(this);
              }
            };
          });
        }
        const page = await ctx.newPage();
        const u = { name: uniqueUser(prefix), ctx, page, errors: [] };
        s.watch(u, page);
        users.push(u);
        await signIn(page, broker.baseUrl, u.name);
        return u;
      },
      /** Records a page's errors (uncaught exceptions, console errors) for the failure report. */
      watch(u, page) {
        page.on('pageerror', (e) => u.errors.push(`pageerror: ${e.message}`));
        page.on('console', (m) => { if (m.type() === 'error') u.errors.push(`console: ${m.text()}`); });
        u.page = page;
      },
    };
    try {
      await body(s);
    } catch (err) {
      const dir = path.join(ensureArtifactsDir(), 'failures');
      mkdirSync(dir, { recursive: true });
      const slug = name.replace(/[^a-z0-9]+/gi, '-').slice(0, 60);
      for (const [i, u] of users.entries()) {
        if (!u.page.isClosed()) {
          await u.page.screenshot({ path: path.join(dir, `${slug}-${i}-${u.name}.png`), timeout: 5_000 }).catch(() => {});
        }
        if (u.errors.length) console.error(`page errors of ${u.name}:\n  ${u.errors.join('\n  ')}`);
      }
      console.error(`broker stderr (tail):\n${broker.stderr().slice(-4000)}`);
      throw err;
    } finally {
      for (const ctx of contexts) await ctx.close().catch(() => {});
    }
  };
}

describe('demo chat page in Chromium', () => {
  before(async () => {
    broker = await startBroker();
    browser = await launchBrowser();
  }, { timeout: 60_000 });

  after(async () => {
    await browser?.close().catch(() => {});
    await broker?.stop();
  }, { timeout: 30_000 });

  it('two users in two browser contexts exchange messages live, in order, in both directions',
    { timeout: TEST_TIMEOUT_MS }, scenario('live exchange', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      await startDirect(alice.page, bob.name);
      const dm = directId(alice.name, bob.name);
      // Bob learns about the conversation live (a feed event) and opens it.
      await openConversation(bob.page, dm);

      const script = [
        [alice, 'hello bob'],
        [bob, 'hi alice!'],
        [alice, 'how are you?'],
        [alice, 'two in a row'],
        [bob, 'fine, thanks'],
        [bob, 'and you? <b>not bold</b>'],
        [alice, 'great 🎉'],
      ];
      for (const [from, msg] of script) {
        await send(from.page, msg);
        for (const u of [alice, bob]) await waitForMessage(u.page, msg);
      }
      // A multi-line message: Shift+Enter is a newline, Enter sends.
      const composer = tid(bob.page, 'composer');
      await composer.click();
      await bob.page.keyboard.type('line one');
      await bob.page.keyboard.press('Shift+Enter');
      await bob.page.keyboard.type('line two');
      await bob.page.keyboard.press('Enter');
      script.push([bob, 'line one\nline two']);
      await waitForMessage(alice.page, 'line one\nline two');

      for (const u of [alice, bob]) {
        const shown = await messages(u.page);
        assert.deepEqual(shown.map((m) => [m.sender, m.text]), script.map(([f, m]) => [f.name, m]),
          `messages as ${u.name} sees them`);
        assertOrdered(await rows(u.page));
        for (const m of shown) assert.equal(m.own, m.sender === u.name, `own flag of #${m.seq} for ${u.name}`);
        // Nothing left pending, and the conversation starts with its system entry.
        assert.equal(await tid(u.page, 'message-pending').count(), 0);
        const first = (await rows(u.page))[0];
        assert.equal(first.kind, 'system-entry');
        assert.equal(first.seq, 1);
      }
      // Both see the same seqs.
      assert.deepEqual((await rows(alice.page)).map((r) => r.seq), (await rows(bob.page)).map((r) => r.seq));
      // Own messages sit on the right (their row is aligned to the end).
      const align = await alice.page.$eval('[data-testid="message"][data-own="true"]', (e) => getComputedStyle(e).alignSelf);
      assert.equal(align, 'flex-end');
      // Alice's latest own message ("great 🎉") is read by Bob, who has the conversation open.
      await waitForReceipt(alice.page, 'great 🎉', `Read by ${bob.name}`);
    }));

  it('a user who was offline catches up on the messages sent meanwhile, without duplicates',
    { timeout: TEST_TIMEOUT_MS }, scenario('offline catch-up', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      await startDirect(alice.page, bob.name);
      const dm = directId(alice.name, bob.name);
      await openConversation(bob.page, dm);
      await send(alice.page, 'before 1');
      await waitForMessage(bob.page, 'before 1');
      await send(bob.page, 'before 2');
      await waitForMessage(alice.page, 'before 2');

      // 1. Bob leaves the page (its WebSocket closes); the tab keeps its sessionStorage.
      await bob.page.goto('about:blank');
      const missed = Array.from({ length: 10 }, (_, i) => `while away ${i + 1}`);
      for (const m of missed) await send(alice.page, m);
      await waitForMessage(alice.page, missed.at(-1));
      await eventually(async () => assert.equal(await tid(alice.page, 'message-pending').count(), 0));

      // Bob comes back in the same tab: still signed in, and the unread badge counts what he missed.
      await bob.page.goto(broker.baseUrl);
      await waitConnected(bob.page);
      assert.equal(await text(bob.page, 'current-user'), bob.name);
      await eventually(async () => assert.equal(await text(bob.page, `unread-${dm}`), String(missed.length)),
        { message: 'unread badge after coming back' });
      await openConversation(bob.page, dm);
      await waitForMessage(bob.page, missed.at(-1));
      await eventually(async () => assert.equal(await tid(bob.page, `unread-${dm}`).isVisible(), false));
      let expected = ['before 1', 'before 2', ...missed];
      let shown = await messages(bob.page);
      assert.deepEqual(shown.map((m) => m.text), expected);
      assertOrdered(await rows(bob.page));
      assert.equal(new Set(shown.map((m) => m.seq)).size, shown.length, 'data-seq unique');

      // Live again: one more message arrives once.
      await send(alice.page, 'welcome back');
      expected.push('welcome back');
      await waitForMessage(bob.page, 'welcome back');
      // Bob, who has the conversation open, has read it (and Alice was told) before he leaves.
      await waitForReceipt(alice.page, 'welcome back', `Read by ${bob.name}`);

      // 2. Bob closes the tab altogether, messages are sent, he opens a new tab and signs in again.
      await bob.page.close();
      const missed2 = Array.from({ length: 5 }, (_, i) => `second absence ${i + 1}`);
      for (const m of missed2) await send(alice.page, m);
      await waitForMessage(alice.page, missed2.at(-1));
      expected = [...expected, ...missed2];
      s.watch(bob, await bob.ctx.newPage());
      await signIn(bob.page, broker.baseUrl, bob.name);
      await eventually(async () => assert.equal(await text(bob.page, `unread-${dm}`), String(missed2.length)));
      await openConversation(bob.page, dm);
      await waitForMessage(bob.page, missed2.at(-1));
      // A live message after the catch-up.
      await send(alice.page, 'last one');
      expected.push('last one');
      await waitForMessage(bob.page, 'last one');
      // Give a duplicate the time to show up, if there were one.
      await bob.page.waitForTimeout(500);
      shown = await messages(bob.page);
      assert.deepEqual(shown.map((m) => m.text), expected);
      const all = await rows(bob.page);
      assertOrdered(all);
      assert.equal(new Set(all.map((r) => r.seq)).size, all.length, 'data-seq unique');
      assert.deepEqual(all.map((r) => r.seq), Array.from({ length: all.length }, (_, i) => i + 1), 'no gaps');
      // Alice sees exactly the same log.
      const comparable = (r) => [r.seq, r.kind, r.kind === 'message' ? r.text : r.sender];
      assert.deepEqual((await rows(alice.page)).map(comparable), all.map(comparable));
    }));

  it('a user whose connection drops shows reconnecting and receives what was sent meanwhile once',
    { timeout: TEST_TIMEOUT_MS }, scenario('connection drop', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob', { trackSockets: true });
      await startDirect(alice.page, bob.name);
      const dm = directId(alice.name, bob.name);
      await openConversation(bob.page, dm);
      await send(alice.page, 'first');
      await waitForMessage(bob.page, 'first');

      // Bob's network goes away: Chromium's offline mode blocks new connections (but leaves
      // open ones alone), so the test also drops the open WebSocket. The page stays; the
      // client keeps retrying.
      await bob.ctx.setOffline(true);
      await bob.page.evaluate(() => { for (const ws of window.__testSockets) ws.close(); });
      await bob.page.waitForSelector('[data-testid="conn-state"][data-state="reconnecting"]', { timeout: 10_000 });
      const missed = ['during the outage 1', 'during the outage 2', 'during the outage 3'];
      for (const m of missed) await send(alice.page, m);
      await waitForMessage(alice.page, missed.at(-1));
      await bob.ctx.setOffline(false);
      await waitConnected(bob.page, 40_000);
      for (const m of missed) await waitForMessage(bob.page, m);
      await send(alice.page, 'after');
      await waitForMessage(bob.page, 'after');
      await bob.page.waitForTimeout(300);
      const shown = await messages(bob.page);
      assert.deepEqual(shown.map((m) => m.text), ['first', ...missed, 'after']);
      assertOrdered(await rows(bob.page));
    }));

  it('the typing indicator shows while the other user types and hides when they send or stop',
    { timeout: TEST_TIMEOUT_MS }, scenario('typing', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      await startDirect(alice.page, bob.name);
      const dm = directId(alice.name, bob.name);
      await openConversation(bob.page, dm);
      const indicator = tid(bob.page, 'typing-indicator');
      assert.equal(await indicator.isVisible(), false);

      await tid(alice.page, 'composer').click();
      await alice.page.keyboard.type('I am wri');
      await indicator.waitFor({ state: 'visible', timeout: 10_000 });
      assert.equal(await indicator.textContent(), `${alice.name} is typing…`);
      await alice.page.keyboard.type('ting');
      await alice.page.keyboard.press('Enter');
      await waitForMessage(bob.page, 'I am writing');
      await indicator.waitFor({ state: 'hidden', timeout: 10_000 });

      // Typing, then leaving the composer (blur) stops the indicator too. Typing updates are
      // coalesced to one per second by the broker, so start after that.
      await alice.page.waitForTimeout(1_100);
      await alice.page.keyboard.type('hmm');
      await indicator.waitFor({ state: 'visible', timeout: 10_000 });
      await tid(alice.page, 'conv-list').click({ position: { x: 5, y: 5 } }).catch(() => {});
      await alice.page.evaluate(() => document.activeElement && document.activeElement.blur());
      await indicator.waitFor({ state: 'hidden', timeout: 10_000 });
    }));

  it('unread badges count new messages of conversations that are not open, sort by activity, and clear on opening',
    { timeout: TEST_TIMEOUT_MS }, scenario('unread', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      const carol = await s.user('carol');
      const dmAB = directId(alice.name, bob.name);
      const dmCB = directId(carol.name, bob.name);
      await startDirect(alice.page, bob.name);
      await startDirect(carol.page, bob.name);
      for (const m of ['one', 'two', 'three']) await send(alice.page, m);
      await waitForMessage(alice.page, 'three');
      // Bob has neither conversation open: both appear live, Alice's with 3 unread.
      await eventually(async () => assert.equal(await text(bob.page, `unread-${dmAB}`), '3'),
        { message: 'bob unread from alice' });
      assert.equal(await tid(bob.page, `unread-${dmCB}`).isVisible(), false);
      // Carol writes: her conversation moves to the top.
      await send(carol.page, 'hey bob');
      await eventually(async () => assert.equal(await text(bob.page, `unread-${dmCB}`), '1'));
      const order = async () => bob.page.$$eval('[data-testid="conv-list"] [data-conversation-id]',
        (els) => els.map((e) => e.dataset.conversationId));
      await eventually(async () => assert.deepEqual(await order(), [dmCB, dmAB]));
      // Presence dots: both peers are online.
      for (const u of [alice, carol]) {
        await eventually(async () => assert.equal(
          await tid(bob.page, `presence-${u.name}`).getAttribute('data-online'), 'true'));
      }

      // Opening Alice's conversation clears its badge and tells Alice it was read.
      await openConversation(bob.page, dmAB);
      await waitForMessage(bob.page, 'three');
      await eventually(async () => assert.equal(await tid(bob.page, `unread-${dmAB}`).isVisible(), false));
      assert.equal(await text(bob.page, `unread-${dmCB}`), '1');
      await waitForReceipt(alice.page, 'three', `Read by ${bob.name}`);
      // A message to the open conversation does not count as unread.
      await send(alice.page, 'four');
      await waitForMessage(bob.page, 'four');
      await bob.page.waitForTimeout(300);
      assert.equal(await tid(bob.page, `unread-${dmAB}`).isVisible(), false);
      // Carol leaves: Bob sees her go offline after the broker's grace period, with "last seen".
      await carol.page.close();
      await eventually(async () => {
        const dot = tid(bob.page, `presence-${carol.name}`);
        assert.equal(await dot.getAttribute('data-online'), 'false');
        assert.match(await dot.getAttribute('title'), /^last seen \d\d:\d\d$/);
      }, { timeoutMs: 20_000, message: 'carol offline' });
    }));

  it('scrolling up loads older history pages until the beginning, without gaps or duplicates',
    { timeout: TEST_TIMEOUT_MS }, scenario('history paging', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      await startDirect(alice.page, bob.name);
      const dm = directId(alice.name, bob.name);
      const count = 130;
      // Fill the log quickly from a second client in Alice's page (the same browser client).
      await alice.page.evaluate(async ({ conv, n }) => {
        const { Switchboard } = await import('/switchboard.js');
        const token = sessionStorage.getItem('switchboard.demo.token');
        const c = await Switchboard.connect({ url: `ws://${location.host}/ws`, token });
        try {
          for (let i = 1; i <= n; i++) await c.send(conv, `bulk ${i}`);
        } finally {
          await c.close();
        }
      }, { conv: dm, n: count });
      await waitForMessage(alice.page, `bulk ${count}`, 20_000);

      await openConversation(bob.page, dm);
      await waitForMessage(bob.page, `bulk ${count}`);
      const initial = (await rows(bob.page)).length;
      assert.ok(initial < count + 1, `the first page is not everything (${initial} rows)`);
      await eventually(async () => {
        await bob.page.$eval('[data-testid="message-list"]', (e) => { e.scrollTop = 0; });
        assert.equal(await text(bob.page, 'history-top'), 'Beginning of the conversation');
      }, { timeoutMs: 20_000, intervalMs: 250, message: 'scrolled to the beginning' });
      const all = await rows(bob.page);
      assert.deepEqual(all.map((r) => r.seq), Array.from({ length: count + 1 }, (_, i) => i + 1));
      assert.deepEqual((await messages(bob.page)).map((m) => m.text),
        Array.from({ length: count }, (_, i) => `bulk ${i + 1}`));
      // Unread was counted from the summary and cleared by opening.
      assert.equal(await tid(bob.page, `unread-${dm}`).isVisible(), false);
    }));

  it('a reload stays signed in, and signing out returns to the sign-in screen for good',
    { timeout: TEST_TIMEOUT_MS }, scenario('reload and sign out', async (s) => {
      const alice = await s.user('alice');
      const bob = await s.user('bob');
      await startDirect(alice.page, bob.name);
      await send(alice.page, 'persist me');
      await waitForMessage(alice.page, 'persist me');
      await alice.page.reload();
      await waitConnected(alice.page);
      assert.equal(await text(alice.page, 'current-user'), alice.name);
      assert.equal(await tid(alice.page, 'signin').isVisible(), false);
      await openConversation(alice.page, directId(alice.name, bob.name));
      await waitForMessage(alice.page, 'persist me');

      await tid(alice.page, 'signout-button').click();
      await tid(alice.page, 'signin').waitFor({ state: 'visible' });
      assert.equal(await tid(alice.page, 'app').isVisible(), false);
      await alice.page.reload();
      await tid(alice.page, 'signin').waitFor({ state: 'visible' });
      assert.equal(await tid(alice.page, 'app').isVisible(), false);
    }));

  it('a group shows system entries, "Read by N of M" receipts, and a screenshot is saved to test-artifacts/demo-chat.png',
    { timeout: TEST_TIMEOUT_MS }, scenario('group and screenshot', async (s) => {
      const alice = await s.user('alice', { viewport: { width: 1100, height: 720 } });
      const bob = await s.user('bob');
      const carol = await s.user('carol', { viewport: { width: 390, height: 760 } });
      // A direct conversation too, so the list shows a presence dot.
      await startDirect(alice.page, bob.name);
      await send(alice.page, 'see you in the group');

      await tid(alice.page, 'new-group-toggle').locator('summary').click();
      await tid(alice.page, 'new-group-name').fill('Launch plan');
      await tid(alice.page, 'new-group-members').fill(`${bob.name}, ${carol.name}`);
      await tid(alice.page, 'new-group-submit').click();
      await eventually(async () => assert.equal(await text(alice.page, 'conv-title'), 'Launch plan'));
      const gid = await tid(alice.page, 'message-list').getAttribute('data-conversation-id');
      assert.match(gid, /^g:/);
      await eventually(async () => {
        const sys = (await rows(alice.page)).filter((r) => r.kind === 'system-entry');
        assert.equal(sys.length, 1);
        assert.match(sys[0].text, /^You created the group “Launch plan” with /);
      });
      for (const u of [bob, carol]) await openConversation(u.page, gid);

      await send(alice.page, 'Kick-off tomorrow at 10:00?');
      await waitForMessage(bob.page, 'Kick-off tomorrow at 10:00?');
      await send(bob.page, 'Works for me.');
      await waitForMessage(carol.page, 'Works for me.');
      await send(carol.page, 'Same here. I will bring the slides.');
      await waitForMessage(alice.page, 'Same here. I will bring the slides.');
      await send(alice.page, 'Great, see you there!');
      for (const u of [bob, carol]) await waitForMessage(u.page, 'Great, see you there!');
      await waitForReceipt(alice.page, 'Great, see you there!', 'Read by 2 of 2');
      // Others' messages in a group name their sender.
      const meta = await alice.page.$eval(`[data-testid="message"][data-sender="${bob.name}"] .meta`, (e) => e.textContent);
      assert.ok(meta.startsWith(`${bob.name} · `), meta);

      // Bob starts typing so the screenshot shows the indicator.
      await tid(bob.page, 'composer').click();
      await bob.page.keyboard.type('Shall I book');
      await tid(alice.page, 'typing-indicator').waitFor({ state: 'visible', timeout: 10_000 });
      await tid(carol.page, 'typing-indicator').waitFor({ state: 'visible', timeout: 10_000 });

      const out = path.join(ensureArtifactsDir(), 'demo-chat.png');
      await alice.page.screenshot({ path: out });
      const narrow = path.join(artifactsDir, 'demo-chat-narrow.png');
      await carol.page.screenshot({ path: narrow });
      for (const f of [out, narrow]) {
        assert.ok(statSync(f).size > 5_000, `${f} has content`);
        assert.deepEqual([...readFileSync(f).subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47], `${f} is a PNG`);
      }
      // On the narrow window only the conversation is shown, with a way back to the list.
      assert.equal(await tid(carol.page, 'conv-list').isVisible(), false);
      await tid(carol.page, 'back-button').click();
      await tid(carol.page, 'conv-list').waitFor({ state: 'visible' });
      assert.equal(await tid(carol.page, 'message-list').isVisible(), false);

      // Membership changes (made with the browser client directly: the page has no UI for
      // them) show as system entries and change "of M".
      const dave = uniqueUser('dave');
      const viaClient = (page, fn, arg) => page.evaluate(async ({ src, arg: a }) => {
        const { Switchboard } = await import('/switchboard.js');
        const token = sessionStorage.getItem('switchboard.demo.token');
        const c = await Switchboard.connect({ url: `ws://${location.host}/ws`, token });
        try {
          return await new Function('c', 'a', `return (${src})(c, a);`)(c, a);
        } finally {
          await c.close();
        }
      }, { src: fn.toString(), arg });
      await viaClient(alice.page, async (c, a) => { await c.addMembers(a.gid, [a.dave]); }, { gid, dave });
      await eventually(async () => {
        const sys = (await rows(alice.page)).filter((r) => r.kind === 'system-entry');
        assert.match(sys.at(-1).text, new RegExp(`^You added ${dave} · `));
      });
      await eventually(async () => assert.equal(await text(alice.page, 'receipt-status'), 'Read by 2 of 3'));
      await viaClient(carol.page, async (c, a) => { await c.leave(a.gid); }, { gid });
      await eventually(async () => {
        const sys = (await rows(alice.page)).filter((r) => r.kind === 'system-entry');
        assert.match(sys.at(-1).text, new RegExp(`^${carol.name} left · `));
      });
      await eventually(async () => assert.equal(await text(alice.page, 'receipt-status'), 'Read by 1 of 2'));
      // Carol's own page drops the group from her list.
      await tid(carol.page, `conv-item-${gid}`).waitFor({ state: 'detached', timeout: 10_000 });
    }));
});
