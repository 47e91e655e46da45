"""A TCP proxy that holds every byte a client sends for a fixed delay before passing it on: the
latency between a host and a service far away, on a machine whose kernel has no netem.

`python -m tests.netproxy --delay-ms 1 10.231.0.1:15432=127.0.0.1:5432 [LISTEN=TARGET ...]`

The whole round trip is added to the client's direction; replies pass at once. A request-reply
protocol (PostgreSQL, Redis, a Celery publish) then waits `delay` more per exchange, as it would with
half of it each way. Bytes keep their order, and closing one side closes the other once what was in
flight is delivered. Threads rather than an event loop: `time.sleep` keeps a fraction of a
millisecond, where an event loop's timers (epoll) round every wait up to a whole one.

Written here rather than taken from a library: Toxiproxy, the usual tool, is a Go server that no
package registry this project installs from carries, and what is needed is this one behaviour.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import signal
import socket
import sys
import threading
import time

CHUNK = 256 * 1024


def _close_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Pass bytes on as they come."""
    with contextlib.suppress(OSError):
        while data := source.recv(CHUNK):
            sink.sendall(data)
    _close_write(sink)


def _copy_delayed(source: socket.socket, sink: socket.socket, delay: float) -> None:
    """Pass each chunk on `delay` seconds after it arrived: a reader fills a line, this thread writes."""
    line: collections.deque[tuple[float, bytes]] = collections.deque()
    arrived = threading.Condition()
    ended = False

    def read() -> None:
        nonlocal ended
        with contextlib.suppress(OSError):
            while data := source.recv(CHUNK):
                with arrived:
                    line.append((time.monotonic() + delay, data))
                    arrived.notify()
        with arrived:
            ended = True
            arrived.notify()

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            with arrived:
                while not line and not ended:
                    arrived.wait()
                if not line:
                    break
                due, data = line.popleft()
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            sink.sendall(data)
    except OSError:
        pass
    _close_write(sink)


def _serve(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
    back.start()
    if delay > 0:
        _copy_delayed(client, upstream, delay)
    else:
        _copy(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _listen(listen: tuple[str, int], target: tuple[str, int], delay: float) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(512)

    def accept() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_serve, args=(client, target, delay), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added to every round trip")
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET", help="host:port=host:port")
    args = parser.parse_args(argv)
    routes = [(_address(a), _address(b)) for a, b in (route.split("=", 1) for route in args.routes)]
    servers = [_listen(listen, target, args.delay_ms / 1000) for listen, target in routes]
    print("listening on " + " ".join(f"{h}:{p}" for (h, p), _ in routes), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    main(sys.argv[1:])
