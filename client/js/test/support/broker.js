// Test support: a real broker process on 127.0.0.1 with free ports, development tokens, and
// small helpers to wait for events. (node --test also runs this file; it defines no tests.)

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The broker binary: $SWITCHBOARD_BIN, else target/debug/switchboard of the workspace. */
export function brokerBinary() {
  const bin = process.env.SWITCHBOARD_BIN ?? path.resolve(here, '../../../../target/debug/switchboard');
  if (!existsSync(bin)) {
    throw new Error(`broker binary not found at ${bin}: build it with `
      + '`cargo build -p switchboard-broker --bin switchboard` or set SWITCHBOARD_BIN');
  }
  return bin;
}

const running = new Set();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

/**
 * Starts a broker. Options: `dataDir` (default: a fresh temp dir, removed by `stop`),
 * `listen`/`httpListen` (default 127.0.0.1:0), `durability` (default buffered), `set`
 * (extra `--set` values), `args` (extra command-line arguments).
 */
export async function startBroker(options = {}) {
  const ownDir = !options.dataDir;
  const dataDir = options.dataDir ?? mkdtempSync(path.join(tmpdir(), 'switchboard-js-'));
  const args = [
    '--listen', options.listen ?? '127.0.0.1:0',
    '--http-listen', options.httpListen ?? '127.0.0.1:0',
    '--data-dir', dataDir,
    '--shards', '3',
    '--durability', options.durability ?? 'buffered',
    '--set', 'limits.send_rate_per_sec=100000',
    '--set', 'limits.send_burst=100000',
    ...(options.set ?? []).flatMap((s) => ['--set', s]),
    ...(options.args ?? []),
  ];
  const child = spawn(brokerBinary(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr = (stderr + d).slice(-20_000);
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    running.delete(child);
    resolve({ code, signal });
  }));
  const ready = await readReadyLine(child, exited, () => stderr);
  const broker = {
    dataDir,
    tcp: ready.tcp,
    http: ready.http,
    url: `ws://${ready.http}/ws`,
    token: (user) => devToken(ready.http, user),
    /** Stops the broker (SIGTERM, then SIGKILL) and removes its own data dir. */
    async stop() {
      await stopChild(child, exited, 'SIGTERM');
      if (ownDir) rmSync(dataDir, { recursive: true, force: true });
    },
    /** Kills the broker abruptly (data dir kept). */
    async kill() {
      await stopChild(child, exited, 'SIGKILL');
    },
    stderr: () => stderr,
  };
  return broker;
}

async function readReadyLine(child, exited, stderr) {
  const lines = createInterface({ input: child.stdout });
  const ready = new Promise((resolve) => {
    lines.on('line', (line) => {
      try {
        const event = JSON.parse(line);
        if (event.event === 'ready') resolve(event);
      } catch {
        // Not the ready line.
      }
    });
  });
  const failed = exited.then(({ code, signal }) => {
    throw new Error(`broker exited before ready (code ${code}, signal ${signal}):\n${stderr()}`);
  });
  const timeout = new Promise((_, reject) => {
    setTimeout(() => reject(new Error(`broker not ready in 20 s:\n${stderr()}`)), 20_000).unref();
  });
  return Promise.race([ready, failed, timeout]);
}

async function stopChild(child, exited, signal) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill(signal);
  const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
  await exited;
  clearTimeout(killer);
}

/** A development token for `user` from the broker's `POST /dev/token`. */
export async function devToken(http, user) {
  const response = await fetch(`http://${http}/dev/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ user }),
  });
  if (!response.ok) throw new Error(`dev token: HTTP ${response.status} ${await response.text()}`);
  return (await response.json()).token;
}

/** A user id unique to this run (tests sharing a broker do not see each other). */
export function uniqueUser(name) {
  return `${name}-${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * Records every event of a client by type and lets tests wait for conditions on them.
 */
export class Recorder {
  events = [];
  #waiters = [];

  constructor(client, types = ['message', 'feed', 'presence', 'typing', 'receipt', 'reset',
    'revoked', 'connected', 'disconnected', 'closed']) {
    for (const type of types) {
      client.on(type, (data) => {
        this.events.push({ type, data });
        this.#check();
      });
    }
  }

  of(type) {
    return this.events.filter((e) => e.type === type).map((e) => e.data);
  }

  messages(conversationId) {
    return this.of('message').filter((m) => conversationId === undefined || m.conversationId === conversationId);
  }

  /** Resolves with `predicate(this)` once it is truthy; rejects after `ms`. */
  until(predicate, ms = 10_000, what = 'condition') {
    const value = predicate(this);
    if (value) return Promise.resolve(value);
    return new Promise((resolve, reject) => {
      const waiter = { predicate, resolve, reject };
      waiter.timer = setTimeout(() => {
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        reject(new Error(`timed out waiting for ${what}; events: ${describe(this.events)}`));
      }, ms);
      this.#waiters.push(waiter);
    });
  }

  #check() {
    for (const waiter of [...this.#waiters]) {
      const value = waiter.predicate(this);
      if (value) {
        clearTimeout(waiter.timer);
        this.#waiters = this.#waiters.filter((w) => w !== waiter);
        waiter.resolve(value);
      }
    }
  }
}

function describe(events) {
  return events.slice(-30).map(({ type, data }) => {
    if (type === 'message') return `message(${data.conversationId}#${data.seq})`;
    if (type === 'feed') return `feed(${data.userSeq} ${data.kind} ${data.conversationId})`;
    return `${type}(${JSON.stringify(data, (_k, v) => (typeof v === 'bigint' ? `${v}n` : v))})`;
  }).join(', ');
}

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The text of a message (`<system>` for system entries). */
export const textOf = (m) => (m.content ? m.content.text : '<system>');
