#!/usr/bin/env python3
"""Slow clients: does an authenticated webhook still get its answer while unauthenticated sockets dribble?

    python bench/slow_clients.py [--slow 64] [--interval 1.0] [--kind mixed] [--posts 40]

Issue 13 item 2: "16 unauthenticated sockets sending one byte every 5 s block every authenticated
POST /cases". The run:

1. starts the real daemon (``Daemon``: gunicorn, ``--workers`` × 4 threads, 127.0.0.1, a free port;
   ThreatQ unreachable, so the sync thread only backs off) and times ``--posts`` authenticated
   ``POST /cases`` on an idle daemon (a new connection each, as TheHive's notifier does);
2. connects ``--slow`` sockets that send a request one byte every ``--interval`` seconds:
   ``headers`` ones never finish their header section, ``body`` ones send complete headers with
   ``Content-Length: 4096`` and then dribble the body, ``mixed`` is half of each;
3. once every slow socket has sent its first bytes, times ``--posts`` authenticated posts again;
4. keeps dribbling until every slow socket was closed by the daemon (or ``--hold`` seconds), and
   records when and how (a 408 answer, or closed without one).

Prints the latencies (p50 / p99 / max) idle and under the slow clients, how the slow sockets ended
and when, then PASS/FAIL: every post answered 200 ``queued``; the slowest post under the slow
clients within ``--max-latency`` (1 s, the issue's target); every slow socket closed by the daemon
before ``--hold``. The last line is ``slow_clients: N passed, M failed``; exit code 1 if a check
failed. The clients run on the same machine as the daemon.

Figures measured here (2 vCPU, Linux, Python 3.11.7, gunicorn 27.0.1, 2 workers x 4 threads,
40 posts per phase; the clients on the same two CPUs):

| slow sockets | posts idle: p50 / max | posts with the slow sockets: p50 / p99 / max | slow sockets ended |
| --- | --- | --- | --- |
| before (plain gthread), 16 mixed, 1 byte / 5 s, 5 posts | 6 / 68 ms | 30.0 s / 30.0 s / 30.0 s (client timeouts) | 7 of 16 (401 once their headers were complete), 9 never |
| before (plain gthread), 64 mixed, 1 byte / 5 s, 3 posts | - | 30.0 s / 30.0 s / 30.0 s (client timeouts) | 6 of 64 (401), 58 never |
| 16 mixed, 1 byte / 5 s | 6.5 / 15 ms | 7.3 / 14 / 14 ms | 16 of 16, 408 after 10.0-15.0 s (seen at the clients' next byte) |
| 64 mixed, 1 byte / 5 s | 3.2-6 / 10 ms | 6.2-7.3 / 54-103 / 54-103 ms | 64 of 64, 408 after 10.2-10.3 s |
| 64 mixed, 1 byte / 1 s | 5.5-7 / 12-14 ms | 5.4-7.5 / 15-38 / 15-38 ms | 64 of 64, 408 after 10.1-10.2 s |
| 64 header sections, 1 byte / 1 s | 5.7 / 14 ms | 5.5 / 12 / 12 ms | 64 of 64, 408 after 10.0-11.0 s |
| 64 bodies, 1 byte / 1 s | 5.0 / 13 ms | 4.5 / 8.6 / 8.6 ms | 64 of 64, 408 after 11.0-12.0 s |
| 400 mixed, 1 byte / 1 s | 4.5 / 8 ms | 5.5 / 9.8 / 9.8 ms | 400 of 400, 408 after 10.2-11.2 s |

"Before" ran the same script against the code without ``intake.py`` (``git archive HEAD``).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402

from common import HEADERS, Report, Rig, encode, mixed_stream, percentile  # noqa: E402


class SlowClient:
    """One socket sending ``request`` one byte per tick; records how the daemon ended it."""

    def __init__(self, port: int, request: bytes) -> None:
        self.request = request
        self.sent = 0
        self.next_send = 0.0
        self.opened = time.monotonic()
        self.ended: Optional[float] = None
        self.how = ""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)

    def tick(self, interval: float) -> None:
        if self.ended is not None:
            return
        if self._closed_by_server():
            return
        now = time.monotonic()
        if now >= self.next_send and self.sent < len(self.request) - 1:  # never complete
            self.next_send = now + interval
            try:
                self.sock.send(self.request[self.sent:self.sent + 1])
                self.sent += 1
            except OSError as exc:
                self._end(f"send failed ({exc.__class__.__name__})")

    def _closed_by_server(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._end(f"reset ({exc.__class__.__name__})")
            return True
        if data.startswith(b"HTTP/1.1 "):
            self._end(data.split(b" ", 2)[1].decode())
        else:
            self._end("closed" if not data else f"answered {data[:20]!r}")
        return True

    def _end(self, how: str) -> None:
        self.ended, self.how = time.monotonic(), how
        self.sock.close()


def slow_request(kind: str, i: int) -> bytes:
    if kind == "headers":
        return (b"POST /cases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + b"".join(b"X-Slow-%d: %s\r\n" % (n, b"z" * 40) for n in range(20)) + b"\r\n")
    body = b'{"pad": "' + b"x" * 4083 + b'"}'
    head = (b"POST /cases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head + body  # the head is sent at once (see main), the body a byte per tick


def timed_posts(url: str, bodies: List[bytes], timeout: float) -> List[Dict[str, object]]:
    out = []
    for body in bodies:
        started = time.monotonic()
        try:
            response = requests.post(url + "/cases", data=body, headers=HEADERS, timeout=timeout)
            status = response.json().get("status") if response.status_code == 200 else response.status_code
        except requests.RequestException as exc:
            status = exc.__class__.__name__
        out.append({"s": time.monotonic() - started, "status": status})
    return out


def summary(results: List[Dict[str, object]]) -> str:
    times = [float(r["s"]) * 1000 for r in results]
    return (f"{len(times)} posts: p50 {percentile(times, 50):.1f} ms, p99 {percentile(times, 99):.1f} ms, "
            f"max {max(times):.1f} ms")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=64, help="slow sockets (default 64)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between their bytes (default 1)")
    parser.add_argument("--kind", choices=("headers", "body", "mixed"), default="mixed")
    parser.add_argument("--posts", type=int, default=40, help="authenticated posts per phase (default 40)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-latency", type=float, default=1.0, help="seconds (default 1, the issue's)")
    parser.add_argument("--hold", type=float, default=90.0, help="seconds to wait for the slow sockets to end")
    args = parser.parse_args(argv)
    report = Report("slow_clients")
    events = [encode(e) for e in mixed_stream(2 * args.posts + 10)]
    with tempfile.TemporaryDirectory(prefix="tq-slow-") as tmp, \
            Rig(Path(tmp), threatq="down", workers=args.workers) as rig:
        url = rig.daemon.url
        timed_posts(url, events[:5], 10)  # warm-up
        idle = timed_posts(url, events[10:10 + args.posts], 30)
        print(f"idle daemon: {summary(idle)}", flush=True)

        kinds = ([args.kind] * args.slow if args.kind != "mixed"
                 else ["headers" if i % 2 else "body" for i in range(args.slow)])
        clients = []
        for i, kind in enumerate(kinds):
            client = SlowClient(rig.daemon.port, slow_request(kind, i))
            if kind == "body":  # complete headers at once; only the body dribbles
                head_end = client.request.index(b"\r\n\r\n") + 4
                client.sock.setblocking(True)
                client.sock.sendall(client.request[:head_end])
                client.sock.setblocking(False)
                client.sent = head_end
            clients.append(client)
        stop = threading.Event()

        def dribble():  # one byte per socket every --interval; the daemon's closing seen within 0.1 s
            while not stop.is_set() and any(c.ended is None for c in clients):
                for client in clients:
                    client.tick(args.interval)
                stop.wait(min(0.1, args.interval))

        pacer = threading.Thread(target=dribble, daemon=True)
        pacer.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(c.sent > 1 or c.ended for c in clients):
            time.sleep(0.05)
        loaded = timed_posts(url, events[10 + args.posts:10 + 2 * args.posts], 30)
        print(f"with {args.slow} slow sockets ({args.kind}, a byte every {args.interval:g} s): "
              f"{summary(loaded)}", flush=True)
        still_open = sum(c.ended is None for c in clients)
        print(f"slow sockets still open after the posts: {still_open}", flush=True)

        end_by = time.monotonic() + args.hold
        while time.monotonic() < end_by and any(c.ended is None for c in clients):
            time.sleep(0.1)
        stop.set()
        pacer.join(timeout=args.interval + 5)
        ended = [c for c in clients if c.ended is not None]
        lifetimes = [c.ended - c.opened for c in ended]
        hows: Dict[str, int] = {}
        for c in ended:
            hows[c.how] = hows.get(c.how, 0) + 1
        if lifetimes:
            print(f"slow sockets ended by the daemon: {len(ended)}/{len(clients)} after "
                  f"{min(lifetimes):.1f} to {max(lifetimes):.1f} s ({json.dumps(hows)})", flush=True)
        for client in clients:
            if client.ended is None:
                client.sock.close()

        report.check("every post answered 200 queued", all(r["status"] == "queued" for r in idle + loaded),
                     f"{sorted({str(r['status']) for r in idle + loaded})}")
        worst = max(float(r["s"]) for r in loaded)
        report.check(f"slowest post under slow clients within {args.max_latency:g} s", worst <= args.max_latency,
                     f"{worst * 1000:.0f} ms")
        report.check("every slow socket closed by the daemon", len(ended) == len(clients),
                     f"{len(ended)}/{len(clients)} within {args.hold:g} s")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
