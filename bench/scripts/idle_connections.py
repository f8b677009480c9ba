#!/usr/bin/env python3
"""Broker memory per idle, authenticated connection, over TCP or WebSocket.

Opens N connections, each completing the handshake as its own user, waits, and reads the
broker's RSS from /proc; then opens N more. The second figure (the marginal cost) excludes
one-time growth such as per-thread allocator heaps. Standard library only.

    python3 bench/scripts/idle_connections.py <broker-pid> <N> <data-dir>/jwt.secret [port] [ws]

With `ws`, `port` is the HTTP port and each connection upgrades at /ws with the JSON
subprotocol and says Hello in JSON.
"""
import asyncio, base64, hashlib, hmac, json, os, sys, time

def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=')
def token(secret, user):
    h = b64(json.dumps({"alg":"HS256","typ":"JWT"}).encode())
    p = b64(json.dumps({"sub":user,"exp":int(time.time())+3600}).encode())
    s = b64(hmac.new(secret, h+b'.'+p, hashlib.sha256).digest())
    return (h+b'.'+p+b'.'+s)
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7f; n >>= 7
        if n: out.append(b|0x80)
        else: out.append(b); return bytes(out)
def ld(field, payload): return varint((field<<3)|2) + varint(len(payload)) + payload
def hello_frame(tok):
    hello = b'\x08\x01' + ld(2, tok)
    body = b'\x08\x01' + ld(2, hello)
    return len(body).to_bytes(4,'big') + body

PORT = 7400
WS = False

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1])

def ws_text_frame(payload):
    """A masked client text frame (RFC 6455)."""
    mask = os.urandom(4)
    head = bytearray([0x81])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 65536:
        head.append(0x80 | 126)
        head += n.to_bytes(2, 'big')
    else:
        head.append(0x80 | 127)
        head += n.to_bytes(8, 'big')
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

async def ws_read_frame(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7f
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), 'big')
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), 'big')
    return await r.readexactly(n)

async def ws_connect(secret, i):
    r, w = await asyncio.open_connection('127.0.0.1', PORT)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
             f"Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n").encode())
    head = await r.readuntil(b"\r\n\r\n")
    assert b" 101 " in head.split(b"\r\n")[0], head
    hello = json.dumps({"requestId": "1", "hello": {"protocolVersion": 1, "token": token(secret, f"idle{i}").decode()}})
    w.write(ws_text_frame(hello.encode()))
    return r, w

async def batch(secret, start, n, conns):
    new = []
    for i in range(start, start + n):
        if WS:
            new.append(await ws_connect(secret, i))
        else:
            r, w = await asyncio.open_connection('127.0.0.1', PORT)
            w.write(hello_frame(token(secret, f"idle{i}")))
            new.append((r, w))
    for r, w in new:
        if WS:
            await ws_read_frame(r)
        else:
            hdr = await r.readexactly(4)
            await r.readexactly(int.from_bytes(hdr, 'big'))
    conns.extend(new)
async def main():
    pid, n, secret = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], 'rb').read().strip()
    global PORT, WS
    PORT = int(sys.argv[4]) if len(sys.argv) > 4 else 7400
    WS = len(sys.argv) > 5 and sys.argv[5] == "ws"
    conns = []
    r0 = rss(pid)
    await batch(secret, 0, n, conns); await asyncio.sleep(2); r1 = rss(pid)
    await batch(secret, n, n, conns); await asyncio.sleep(2); r2 = rss(pid)
    print(f"RSS {r0} -> {r1} ({n} conns) -> {r2} ({2*n} conns) KiB; first {n}: {(r1-r0)*1024/n:.0f} B/conn, next {n}: {(r2-r1)*1024/n:.0f} B/conn")
    for r, w in conns: w.close()
asyncio.run(main())
