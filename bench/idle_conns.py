#!/usr/bin/env python3
"""Open N idle HTTP/1.1 keep-alive connections to a server and hold them until told to stop.

Used by bench/harness.py to measure the memory a server spends per idle keep-alive connection.
Each connection sends one request and reads the whole response first, so what the server holds
afterwards is a keep-alive connection between requests (the state a browser's pooled socket is
in), not a connection that never spoke: servers bound that state with a shorter timeout.

Protocol with the parent: this program prints one line `ready OK FAILED FIRST_ERROR` on stdout
once every connection is open (or has failed), then keeps the connections open until its
standard input is closed, and exits.
"""

import argparse
import asyncio
import resource
import ssl
import sys


async def open_one(host, port, ctx, path, gate):
    async with gate:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=host if ctx else None
        )
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: gatehouse-bench\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ")
        if len(status) < 2 or status[1] != "200":
            raise RuntimeError(f"answer {lines[0]!r}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise RuntimeError("answer without Content-Length")
        await reader.readexactly(length)
        return writer


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/small.txt")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--parallel", type=int, default=64, help="connections being opened at once")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    ctx = None
    if args.tls:
        ctx = ssl.create_default_context(cafile=args.cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    gate = asyncio.Semaphore(args.parallel)
    results = await asyncio.gather(
        *(open_one(args.host, args.port, ctx, args.path, gate) for _ in range(args.connections)),
        return_exceptions=True,
    )
    writers = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    first = f"{type(errors[0]).__name__}: {errors[0]}".replace("\n", " ") if errors else "-"
    print(f"ready {len(writers)} {len(errors)} {first}", flush=True)

    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
