// Shared pieces of the browser tests: a real broker process, a real Chromium, and small
// polling helpers (playwright-core has no `expect`).
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');
export const artifactsDir = path.join(repoRoot, 'test-artifacts');

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

/** The broker binary: $SWITCHBOARD_BIN, else target/debug/switchboard of this repo. */
export function brokerBin() {
  return process.env.SWITCHBOARD_BIN || path.join(repoRoot, 'target', 'debug', 'switchboard');
}

const children = new Set();
// Last resort: never leave a broker behind, whatever happens to this process (Playwright
// closes the browsers it launched on exit and on these signals itself).
function killChildren() {
  for (const c of children) {
    try { c.kill('SIGKILL'); } catch { /* gone */ }
  }
}
process.on('exit', killChildren);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killChildren();
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 })[signal]);
  });
}

/**
 * Starts a broker on ephemeral loopback ports with a fresh data directory and waits for its
 * ready line. Returns { http, tcp, baseUrl, wsUrl, stop(), stderr() }.
 */
export async function startBroker({ extraArgs = [], readyTimeoutMs = 30_000 } = {}) {
  const bin = brokerBin();
  if (!existsSync(bin)) {
    throw new Error(`broker binary not found at ${bin}: build it (cargo build -p switchboard-broker --bin switchboard) or set SWITCHBOARD_BIN`);
  }
  const dataDir = mkdtempSync(path.join(tmpdir(), 'switchboard-browser-'));
  const args = [
    '--listen', '127.0.0.1:0',
    '--http-listen', '127.0.0.1:0',
    '--data-dir', dataDir,
    '--shards', '3',
    '--durability', 'buffered',
    ...extraArgs,
  ];
  const child = spawn(bin, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, SWITCHBOARD_LOG: process.env.SWITCHBOARD_LOG || 'warn' },
  });
  children.add(child);
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    children.delete(child);
    resolve({ code, signal });
  }));

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5_000);
      await exited;
      clearTimeout(t);
    }
    rmSync(dataDir, { recursive: true, force: true });
  };

  const ready = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`broker not ready after ${readyTimeoutMs} ms\n${stderr}`)), readyTimeoutMs);
    const lines = createInterface({ input: child.stdout });
    lines.on('line', (line) => {
      let j;
      try { j = JSON.parse(line); } catch { return; }
      if (j && j.event === 'ready') {
        clearTimeout(timer);
        resolve(j);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`broker exited (code ${code}, signal ${signal}) before ready\n${stderr}`));
    });
  }).catch(async (err) => { await stop(); throw err; });

  if (!ready.http) {
    await stop();
    throw new Error(`ready line has no http address: ${JSON.stringify(ready)}`);
  }
  return {
    ...ready,
    baseUrl: `http://${ready.http}/`,
    wsUrl: `ws://${ready.http}/ws`,
    stop,
    stderr: () => stderr,
  };
}

/** Launches Debian's Chromium headless (Playwright gives it a fresh temporary user-data dir). */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
}

/** A unique user name for a test, so tests sharing one broker do not see each other. */
export function uniqueUser(prefix) {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

export function directId(a, b) {
  return Buffer.compare(Buffer.from(a), Buffer.from(b)) < 0 ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

/** An HS256 JWT for `user`, signed with `secret`. */
export function mintJwt(secret, user, ttlSecs = 3600) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, iat: now, exp: now + ttlSecs })}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

export function ensureArtifactsDir() {
  mkdirSync(artifactsDir, { recursive: true });
  return artifactsDir;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Retries `fn` until it returns without throwing (returning its value), or throws the last
 * error after `timeoutMs`.
 */
export async function eventually(fn, { timeoutMs = 10_000, intervalMs = 100, message } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) {
      const e = new Error(`${message ? `${message}: ` : ''}not true after ${timeoutMs} ms: ${last && last.message}`);
      e.cause = last;
      throw e;
    }
    await sleep(intervalMs);
  }
}

// ---------------------------------------------------------------------------
// Page helpers (the data-testid contract of client/js/demo/app.js)
// ---------------------------------------------------------------------------

export const tid = (page, id) => page.getByTestId(id, { exact: true });

/** Opens the demo page and signs in as `user` through POST /dev/token. */
export async function signIn(page, baseUrl, user) {
  await page.goto(baseUrl);
  await tid(page, 'signin-name').fill(user);
  await tid(page, 'signin-submit').click();
  await waitConnected(page);
}

export async function waitConnected(page, timeoutMs = 15_000) {
  await page.waitForSelector('[data-testid="conn-state"][data-state="connected"]', { timeout: timeoutMs });
}

/** Starts (or opens) the direct conversation with `other` from the sidebar form. */
export async function startDirect(page, other) {
  await tid(page, 'new-direct-user').fill(other);
  await tid(page, 'new-direct-submit').click();
  await tid(page, 'chat-pane').waitFor({ state: 'visible' });
  await eventually(async () => {
    const t = await tid(page, 'conv-title').textContent();
    if (t !== other) throw new Error(`title is ${JSON.stringify(t)}`);
  });
}

export async function openConversation(page, id) {
  const item = tid(page, `conv-item-${id}`);
  await item.waitFor({ state: 'visible', timeout: 15_000 });
  await item.click();
  await page.waitForSelector(`[data-testid="message-list"][data-conversation-id="${id}"]`);
  // The first history page is in once the top line says something about older entries or the
  // log has rows.
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll('[data-testid="message-list"] [data-seq]:is([data-testid="message"], [data-testid="system-entry"])');
    return rows.length > 0;
  }, null, { timeout: 15_000 });
}

export async function send(page, text) {
  await tid(page, 'composer').fill(text);
  await tid(page, 'composer').press('Enter');
}

/** Every log row shown: { seq, sender, text, kind: 'message' | 'system-entry', own }. */
export async function rows(page) {
  return page.$$eval('[data-testid="message-list"] [data-seq]:is([data-testid="message"], [data-testid="system-entry"])', (els) => els.map((e) => ({
    seq: Number(e.dataset.seq),
    sender: e.dataset.sender,
    kind: e.dataset.testid,
    own: e.dataset.own === 'true',
    text: e.dataset.testid === 'message'
      ? e.querySelector('[data-testid="message-text"]').textContent
      : e.textContent,
  })));
}

export async function messages(page) {
  return (await rows(page)).filter((r) => r.kind === 'message');
}

/** Waits until the open conversation shows a user message with `text`. */
export async function waitForMessage(page, text, timeoutMs = 10_000) {
  await eventually(async () => {
    const m = await messages(page);
    if (!m.some((r) => r.text === text)) throw new Error(`no message ${JSON.stringify(text)} in ${JSON.stringify(m.map((r) => r.text))}`);
  }, { timeoutMs });
}

/** Waits until the receipt status under the own message `ownText` (once it has its seq) reads
 * `expected`: a status left from an earlier own message, shown before this one is
 * acknowledged, does not count. */
export async function waitForReceipt(page, ownText, expected, { timeoutMs = 10_000 } = {}) {
  await eventually(async () => {
    const own = (await messages(page)).find((r) => r.own && r.text === ownText && r.seq > 0);
    if (!own) throw new Error(`own message ${JSON.stringify(ownText)} not acknowledged yet`);
    const status = tid(page, 'receipt-status');
    const forSeq = await status.getAttribute('data-for-seq');
    const shown = (await status.textContent()) ?? '';
    if (forSeq !== String(own.seq) || shown !== expected) {
      throw new Error(`receipt status ${JSON.stringify(shown)} for seq ${forSeq}, want ${JSON.stringify(expected)} for seq ${own.seq}`);
    }
  }, { timeoutMs, message: `receipt ${JSON.stringify(expected)} for ${JSON.stringify(ownText)}` });
}

export async function text(page, id) {
  return (await tid(page, id).textContent()) ?? '';
}

/** Asserts that seqs are unique and strictly ascending in display order. */
export function assertOrdered(list) {
  for (let i = 1; i < list.length; i++) {
    if (!(list[i].seq > list[i - 1].seq)) {
      throw new Error(`rows out of order or duplicated at ${i}: ${list[i - 1].seq} then ${list[i].seq}`);
    }
  }
}
