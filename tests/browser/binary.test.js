// A browser speaking the binary subprotocol (`switchboard.v1.proto`): protobuf frames in
// binary WebSocket messages, hand-encoded in the page (the browser client uses JSON; this shows
// the bridge serves both to a real browser). A JSON session receives what the binary one sends.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import { directId, launchBrowser, startBroker, uniqueUser } from './harness.js';

let broker;
let browser;

describe('binary subprotocol in a browser', () => {
  before(async () => {
    broker = await startBroker();
    browser = await launchBrowser();
  }, { timeout: 60_000 });

  after(async () => {
    await browser?.close().catch(() => {});
    await broker?.stop();
  }, { timeout: 30_000 });

  it('a binary session sends and a JSON session in another browser context receives it', { timeout: 60_000 }, async () => {
    const alice = uniqueUser('alice');
    const bob = uniqueUser('bob');
    const conv = directId(alice, bob);
    const ctx = await browser.newContext();
    try {
      const page = await ctx.newPage();
      await page.goto(broker.baseUrl);
      const result = await page.evaluate(async ({ alice, bob, conv }) => {
        const enc = new TextEncoder();
        const varint = (n) => {
          const out = [];
          let v = BigInt(n);
          do {
            let b = Number(v & 0x7fn);
            v >>= 7n;
            if (v) b |= 0x80;
            out.push(b);
          } while (v);
          return out;
        };
        const num = (field, n) => [...varint(field << 3), ...varint(n)];
        const bytes = (field, b) => [...varint((field << 3) | 2), ...varint(b.length), ...b];
        const str = (field, s) => bytes(field, [...enc.encode(s)]);
        // Top-level field numbers of a ServerFrame, and its request_id.
        const fields = (buf) => {
          const b = new Uint8Array(buf);
          let i = 0;
          const read = () => {
            let v = 0n, s = 0n, x;
            do { x = b[i++]; v |= BigInt(x & 0x7f) << s; s += 7n; } while (x & 0x80);
            return v;
          };
          const seen = {};
          while (i < b.length) {
            const key = Number(read());
            const f = key >> 3, wt = key & 7;
            if (wt === 0) seen[f] = read();
            else if (wt === 2) { const len = Number(read()); seen[f] = b.slice(i, i + len); i += len; }
            else throw new Error('unexpected wire type ' + wt);
          }
          return seen;
        };
        const token = async (user) => {
          const r = await fetch('/dev/token', { method: 'POST', body: JSON.stringify({ user }) });
          return (await r.json()).token;
        };
        const open = (proto) => new Promise((resolve, reject) => {
          const ws = new WebSocket(`ws://${location.host}/ws`, [proto]);
          ws.binaryType = 'arraybuffer';
          const inbox = [];
          const waiters = [];
          ws.onmessage = (e) => { const w = waiters.shift(); if (w) w(e.data); else inbox.push(e.data); };
          ws.onopen = () => resolve({
            ws,
            next: () => new Promise((r) => { const m = inbox.shift(); if (m !== undefined) r(m); else waiters.push(r); }),
          });
          ws.onerror = reject;
        });

        // Bob: JSON.
        const b = await open('switchboard.v1.json');
        b.ws.send(JSON.stringify({ requestId: '1', hello: { protocolVersion: 1, token: await token(bob) } }));
        const welcome = JSON.parse(await b.next());

        // Alice: binary, every frame hand-encoded protobuf.
        const a = await open('switchboard.v1.proto');
        a.ws.send(new Uint8Array([...num(1, 1), ...bytes(2, [...num(1, 1), ...str(2, await token(alice))])]));
        const aWelcome = fields(await a.next());
        a.ws.send(new Uint8Array([...num(1, 2), ...bytes(7, [...num(1, 1), ...str(3, bob)])]));
        const created = fields(await a.next());
        // Bob's session is subscribed to the new conversation once its feed event arrives
        // (the broker subscribes, then pushes the event). A message sent before that would
        // reach him only through a sync, which this raw client does not do.
        for (;;) {
          const f = JSON.parse(await b.next());
          if (f.feedEvent) break;
        }
        a.ws.send(new Uint8Array([...num(1, 3), ...bytes(4, [
          ...str(1, conv), ...str(2, 'b1'), ...bytes(3, str(2, 'hello from a binary socket')),
        ])]));
        let ack;
        for (;;) {
          const f = fields(await a.next());
          if (f[1] === 3n) { ack = f; break; }
        }
        // Then the message, live.
        let message;
        for (;;) {
          const f = JSON.parse(await b.next());
          if (f.message && f.message.content) { message = f.message; break; }
        }
        a.ws.close();
        b.ws.close();
        return {
          jsonWelcomeUser: welcome.welcome.userId,
          binaryProtocol: a.ws.protocol,
          binaryWelcome: aWelcome[2] !== undefined && aWelcome[1] === 1n,
          created: created[9] !== undefined,
          acked: ack[6] !== undefined,
          text: message.content.text,
          sender: message.sender,
          seq: message.seq,
        };
      }, { alice, bob, conv });
      assert.equal(result.jsonWelcomeUser, bob);
      assert.equal(result.binaryProtocol, 'switchboard.v1.proto');
      assert.ok(result.binaryWelcome, 'Welcome (ServerFrame field 2) with request id 1');
      assert.ok(result.created, 'Conversation reply (field 9)');
      assert.ok(result.acked, 'SendAck (field 6)');
      assert.deepEqual([result.text, result.sender, result.seq], ['hello from a binary socket', alice, '2']);
    } finally {
      await ctx.close();
    }
  });
});
