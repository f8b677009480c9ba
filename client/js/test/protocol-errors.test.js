// The broker's answer to broken JSON frames, on a raw WebSocket (no client library).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { startBroker } from './support/broker.js';

/** Opens a raw WebSocket, sends `texts` once open, and collects frames until it closes. */
function rawSession(url, texts, protocol = 'switchboard.v1.json') {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocol);
    const frames = [];
    const timer = setTimeout(() => reject(new Error(`no close; frames: ${JSON.stringify(frames)}`)), 10_000);
    ws.addEventListener('open', () => texts.forEach((t) => ws.send(t)));
    ws.addEventListener('message', (ev) => frames.push(JSON.parse(ev.data)));
    ws.addEventListener('close', (ev) => {
      clearTimeout(timer);
      resolve({ frames, code: ev.code, protocol: ws.protocol });
    });
  });
}

describe('protocol errors on a raw WebSocket', () => {
  let broker;
  before(async () => {
    broker = await startBroker();
  });
  after(async () => {
    await broker?.stop();
  });

  test('given a text message that is not JSON should the broker send an Error, then a Disconnect, then close', async () => {
    const { frames, protocol } = await rawSession(broker.url, ['this is not JSON']);
    assert.equal(protocol, 'switchboard.v1.json');
    assert.equal(frames.length, 2, JSON.stringify(frames));
    const [error, disconnect] = frames;
    assert.equal(error.requestId, undefined, 'a connection-level error has request id 0');
    assert.equal(error.error.code, 'ERROR_CODE_BAD_REQUEST');
    assert.equal(disconnect.disconnect.reason, 'DISCONNECT_REASON_PROTOCOL_ERROR');
  });

  test('given invalid JSON after a good Hello should the broker also send an Error, then a Disconnect, then close', async () => {
    const token = await broker.token('mallory');
    const hello = JSON.stringify({ requestId: '1', hello: { protocolVersion: 1, token } });
    const { frames } = await rawSession(broker.url, [hello, '{"requestId": "2", "ping": ']);
    assert.deepEqual(frames.map((f) => Object.keys(f).find((k) => k !== 'requestId')), ['welcome', 'error', 'disconnect']);
    assert.equal(frames[0].requestId, '1');
    assert.equal(frames[1].error.code, 'ERROR_CODE_BAD_REQUEST');
    assert.equal(frames[2].disconnect.reason, 'DISCONNECT_REASON_PROTOCOL_ERROR');
  });

  test('given a first frame other than Hello should the broker answer UNAUTHENTICATED, then Disconnect, then close', async () => {
    const { frames } = await rawSession(broker.url, ['{"requestId":"7","ping":{}}']);
    assert.equal(frames[0].requestId, '7');
    assert.equal(frames[0].error.code, 'ERROR_CODE_UNAUTHENTICATED');
    assert.equal(frames[1].disconnect.reason, 'DISCONNECT_REASON_PROTOCOL_ERROR');
  });
});
