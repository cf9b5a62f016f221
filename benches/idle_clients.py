#!/usr/bin/env python3
"""Open N idle PostgreSQL client connections and hold them.

Each client sends a protocol 3.0 StartupMessage (user/database), expects
trust authentication (AuthenticationOk) and reads until ReadyForQuery ('Z'),
so every connection counted is a completed login.  With --tls each client
first sends an SSLRequest, expects 'S' and upgrades the connection to TLS
(no certificate verification: the bench's certificate is self-signed), then
logs in the same way.  When all are logged in it writes the ready file
(contents: number of clients logged in) and then holds every socket open
until SIGTERM/SIGINT/SIGUSR1 arrives or the stop file appears; then it sends
Terminate ('X') on each and exits.

Stdlib only.  Needs `ulimit -n` above N (the caller raises it).
"""
import argparse
import asyncio
import os
import signal
import ssl
import struct
import sys
import time


class LoginError(Exception):
    pass


def startup_message(user, database):
    body = struct.pack("!I", 196608)  # protocol 3.0
    for k, v in (("user", user), ("database", database), ("application_name", "idle_clients")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


SSL_REQUEST = struct.pack("!II", 8, 80877103)


def client_tls_context():
    """TLS without verification: the bench's server certificate is self-signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def login(host, port, msg, timeout, tls=None):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        if tls is not None:
            writer.write(SSL_REQUEST)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readexactly(1), timeout)
            if answer != b"S":
                raise LoginError(f"server refused TLS (answered {answer!r} to SSLRequest)")
            await asyncio.wait_for(writer.start_tls(tls), timeout)
        writer.write(msg)
        await writer.drain()
        while True:
            hdr = await asyncio.wait_for(reader.readexactly(5), timeout)
            typ = hdr[0:1]
            (length,) = struct.unpack("!I", hdr[1:5])
            payload = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if typ == b"R":
                (code,) = struct.unpack("!I", payload[:4])
                if code != 0:
                    raise LoginError(f"server asked for authentication (code {code}); trust auth expected")
            elif typ == b"E":
                fields = dict(
                    (f[0:1], f[1:].decode(errors="replace")) for f in payload.split(b"\0") if f
                )
                raise LoginError(f"server error: {fields.get(b'M', payload)!r}")
            elif typ == b"Z":
                return reader, writer
            # 'S' ParameterStatus, 'K' BackendKeyData, 'N' notice: ignore
    except BaseException:
        writer.close()
        raise


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="bench")
    ap.add_argument("--database", default="bench")
    ap.add_argument("-n", "--clients", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-login timeout (s)")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--tls", action="store_true", help="SSLRequest, then TLS (unverified) before the login")
    ap.add_argument("--hold-max", type=float, default=600.0, help="give up holding after this many seconds")
    args = ap.parse_args()

    msg = startup_message(args.user, args.database)
    tls = client_tls_context() if args.tls else None  # one context shared by every client
    conns = []
    errors = []
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i):
        async with sem:
            last = None
            for attempt in range(args.retries + 1):
                try:
                    conns.append(await login(args.host, args.port, msg, args.timeout, tls))
                    return
                except LoginError as e:  # a protocol-level refusal: don't retry
                    last = e
                    break
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                    last = e
                    await asyncio.sleep(0.2 * (attempt + 1))
            errors.append(f"client {i}: {type(last).__name__}: {last}")

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.clients)))
    elapsed = time.monotonic() - t0
    print(
        f"idle_clients: {len(conns)}/{args.clients} logged in{' over TLS' if tls else ''} in {elapsed:.1f}s, {len(errors)} failed",
        file=sys.stderr,
        flush=True,
    )
    for e in errors[:5]:
        print(f"idle_clients:   {e}", file=sys.stderr)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, stop.set)

    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{len(conns)} {len(errors)} {elapsed:.2f}\n")
    os.replace(tmp, args.ready_file)

    # Hold everything open; also notice connections the server drops.
    deadline = time.monotonic() + args.hold_max
    while not stop.is_set() and time.monotonic() < deadline:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass

    dropped = sum(1 for r, _ in conns if r.at_eof())
    if dropped:
        print(f"idle_clients: {dropped} connections were closed by the server while idle", file=sys.stderr)
    for _, w in conns:
        try:
            w.write(b"X\0\0\0\4")
            w.close()
        except Exception:
            pass
    await asyncio.sleep(0.2)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
