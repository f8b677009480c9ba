#!/usr/bin/env python3
"""Broker memory per idle, authenticated TCP connection.

Opens N connections, each completing the handshake as its own user, waits, and reads the
broker's RSS from /proc; then opens N more. The second figure (the marginal cost) excludes
one-time growth such as per-thread allocator heaps. Standard library only.

    python3 bench/scripts/idle_connections.py <broker-pid> <N> <data-dir>/jwt.secret [port]
"""
import asyncio, base64, hashlib, hmac, json, sys, time

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

def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1])

async def batch(secret, start, n, conns):
    new = []
    for i in range(start, start + n):
        r, w = await asyncio.open_connection('127.0.0.1', PORT)
        w.write(hello_frame(token(secret, f"idle{i}")))
        new.append((r, w))
    for r, w in new:
        hdr = await r.readexactly(4)
        await r.readexactly(int.from_bytes(hdr, 'big'))
    conns.extend(new)
async def main():
    pid, n, secret = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3], 'rb').read().strip()
    global PORT
    PORT = int(sys.argv[4]) if len(sys.argv) > 4 else 7400
    conns = []
    r0 = rss(pid)
    await batch(secret, 0, n, conns); await asyncio.sleep(2); r1 = rss(pid)
    await batch(secret, n, n, conns); await asyncio.sleep(2); r2 = rss(pid)
    print(f"RSS {r0} -> {r1} ({n} conns) -> {r2} ({2*n} conns) KiB; first {n}: {(r1-r0)*1024/n:.0f} B/conn, next {n}: {(r2-r1)*1024/n:.0f} B/conn")
    for r, w in conns: w.close()
asyncio.run(main())
