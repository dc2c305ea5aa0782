"""intake.py: where a request ends (``Framing``), and the worker that reads requests whole before a thread
takes them (``IntakeWorker``), run in this process on a loopback port with short deadlines.

The real daemon under slow clients is tested in tests/e2e/test_daemon.py.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import selectors
import socket
import threading
import time
from typing import Callable, Tuple

import pytest
from gunicorn import config as gunicorn_config
from gunicorn import glogging
from gunicorn import util as gunicorn_util
from gunicorn.workers import gthread

from tq_mw_thehive import intake, server
from tq_mw_thehive.testing.daemon import wait_for
from tq_mw_thehive.intake import MORE, READY, REFUSE, Framing, Limits

# --------------------------------------------------------------------------- Framing


def framing(max_body: int = 1024 * 1024) -> Framing:
    return Framing(Limits(gunicorn_config.Config(), max_body=max_body))


def feed(data: bytes, step: int = 1, max_body: int = 1024 * 1024) -> Tuple[str, int, Framing]:
    """Feed ``data`` ``step`` bytes at a time: (the first answer that is not MORE, bytes fed then, framing)."""
    f, buf = framing(max_body), bytearray()
    for at in range(0, len(data), step):
        buf += data[at:at + step]
        found = f.advance(buf)
        if found != MORE:
            return found, len(buf), f
    return MORE, len(buf), f


HEAD = b"POST /cases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_a_request_is_ready_exactly_when_its_last_byte_arrives(step):
    body = b'{"a": 1}'
    for request in (HEAD + b"Content-Length: 8\r\n\r\n" + body,
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"\r\nGET / HTTP/1.0\r\n\r\n",  # one empty line before the request line is allowed
                    HEAD + b"Content-Length: 0\r\n\r\n",
                    HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n5;ext=1\r\n\": 1}\r\n0\r\n\r\n",
                    HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\nab\r\n0\r\nX-Trailer: 1\r\n\r\n"):
        found, at, _ = feed(request + b"GET /next HTTP/1.1\r\n", step=1)
        assert (found, at) == (READY, len(request)), request
        if step > 1:
            found, at, _ = feed(request, step=step)
            assert found == READY


def test_the_header_section_and_body_progress_are_reported():
    f, buf = framing(), bytearray(HEAD + b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
    assert f.advance(buf) == MORE and f.head_done and f.expect_continue and f.body_received == 0
    buf += b"x" * 60
    assert f.advance(buf) == MORE and f.body_received == 60
    buf += b"x" * 40
    assert f.advance(buf) == READY
    f = framing()
    assert f.advance(bytearray(b"POST /cases HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")) == MORE
    assert not f.expect_continue  # HTTP/1.0: the expectation is ignored


@pytest.mark.parametrize("request_bytes", [
    HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n",      # two lengths: 400
    HEAD + b"Content-Length: +5\r\n\r\n",                          # not digits: 400
    HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",  # both: 400
    HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n",            # chunked not last: 400
    HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n",
    HEAD + b"Transfer-Encoding: foo, chunked\r\n\r\n",             # unknown coding: 501
    b"POST /cases HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",  # chunked HTTP/1.0: 400
    b"POST /cases HTTP/2.0\r\nContent-Length: 5\r\n\r\n",
    HEAD + b"no colon here\r\nContent-Length: 5\r\n\r\n",
    b"POST /cases HTTP/1.1\nHost: x\n\n",                         # bare LF
    b"POST /cases HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n",     # bare LF, head not even complete
    b"GET /" + b"a" * 5000,                                       # request line too long: 414
], ids=["two-lengths", "plus-length", "te-and-cl", "chunked-not-last", "chunked-twice", "unknown-coding",
        "chunked-http10", "http2", "no-colon", "bare-lf", "bare-lf-early", "long-line"])
def test_requests_gunicorn_refuses_are_handed_over_without_waiting_for_a_body(request_bytes):
    """Whatever gunicorn's parser refuses from the header section alone goes to it at once."""
    found, at, _ = feed(request_bytes, step=len(request_bytes))
    assert found == READY


def test_a_body_larger_than_the_app_accepts_is_not_waited_for():
    found, _, _ = feed(HEAD + b"Content-Length: 2000000\r\n\r\n", step=10_000, max_body=1_000_000)
    assert found == READY  # the app answers 413 from Content-Length; the connection is closed
    found, _, _ = feed(HEAD + b"Content-Length: 60000\r\n\r\n", max_body=1000, step=10_000)
    assert found == MORE  # under what gunicorn drains after a refusal: buffered whole, kept alive


def test_a_chunked_body_is_buffered_up_to_what_the_app_reads():
    big = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 4_000_000 + b"y" * 1_200_000
    found, at, f = feed(big, step=100_000, max_body=1_000_000)
    assert found == READY and f.body_received >= 1_000_000 and at < len(big)
    found, _, _ = feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", step=100)
    assert found == READY  # not a chunk size: the parser refuses it
    found, _, _ = feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXX", step=100)
    assert found == READY  # chunk without its CRLF


def test_a_header_section_larger_than_gunicorn_accepts_is_refused_here():
    limits = Limits(gunicorn_config.Config())
    found, at, f = feed(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * (limits.header_section + 10), step=65536)
    assert found == REFUSE and f.refusal[0] == 431


# --------------------------------------------------------------------------- the worker, in this process

def app(environ, start_response):
    """Reads the body (timing the read), except /auth without credentials: 401 unread."""
    if environ["PATH_INFO"] == "/auth" and not environ.get("HTTP_AUTHORIZATION"):
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("Content-Length", "2")])
        return [b"{}"]
    started = time.monotonic()
    body = environ["wsgi.input"].read()
    answer = json.dumps({"len": len(body), "read_ms": (time.monotonic() - started) * 1000,
                         "thread": threading.get_ident(), "body": body[:40].decode("latin-1")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]


class Harness:
    """A gthread worker made an IntakeWorker, running its loop in a thread on 127.0.0.1."""

    def __init__(self, threads: int = 2, worker_connections: int = 64, keepalive: int = 2) -> None:
        cfg = gunicorn_config.Config()
        for name, value in (("threads", threads), ("worker_connections", worker_connections),
                            ("keepalive", keepalive), ("graceful_timeout", 5), ("pre_request", server._pre_request),
                            ("accesslog", None)):
            cfg.set(name, value)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.worker = gthread.ThreadWorker(0, os.getppid(), [self.listener], None, 30, cfg, glogging.Logger(cfg))
        w = self.worker
        w.pid = os.getpid()
        w.tpool = w.get_thread_pool()  # what init_process does, without signals or an app to load
        w.poller = selectors.DefaultSelector()
        w.method_queue.init()
        w.wsgi = app
        assert intake.install(w) and isinstance(w, intake.IntakeWorker)
        self.thread = threading.Thread(target=w.run, daemon=True)

    def __enter__(self) -> "Harness":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.worker.handle_exit(None, None)
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture
def short(monkeypatch):
    """Short deadlines: 0.5 s for the header section, 0.5 s (+1 s per 2,000 bytes) for a body."""
    monkeypatch.setattr(intake, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(intake, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(intake, "BODY_MIN_RATE", 2000)
    monkeypatch.setattr(intake, "SWEEP_INTERVAL_S", 0.02)
    monkeypatch.setattr(intake, "LINGER_S", 0.5)
    monkeypatch.setattr(gunicorn_util, "write_error", server._json_error)  # what _post_worker_init does


def request(path: str = "/cases", body: bytes = b'{"a": 1}', extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), len(body), extra) + body)


def response(sock: socket.socket, method: str = "POST", fp=None) -> Tuple[int, dict, bytes]:
    """One response from ``sock``; pipelined responses must share one ``fp`` (``sock.makefile("rb")``),
    which may have read ahead into the next one."""
    class Kept:  # HTTPResponse closes its file at the end of the body
        def __getattr__(self, name):
            return getattr(fp, name)

        def close(self):
            pass

    class Source:
        def makefile(self, *args, **kwargs):
            return Kept() if fp is not None else sock.makefile("rb")
    r = http.client.HTTPResponse(Source(), method=method)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def ended(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (b"" if it only closed it)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data or b"<reset>"
        if not chunk:
            return data
        data += chunk


def wait_until(condition: Callable[[], object], timeout: float, what: str):
    return wait_for(condition, timeout, what, interval=0.01)


def test_slow_clients_hold_no_thread_and_a_complete_request_is_answered_at_once(short, monkeypatch):
    monkeypatch.setattr(intake, "HEADER_TIMEOUT_S", 5.0)
    with Harness(threads=2) as h:
        slow = [h.connect() for _ in range(12)]  # 6 times the threads
        for i, sock in enumerate(slow):
            sock.sendall(request(body=b"x" * 100)[:10 + i])  # each stops somewhere in its header section
        for _ in range(3):
            sock = h.connect()
            started = time.monotonic()
            sock.sendall(request())
            status, _, body = response(sock)
            assert status == 200 and json.loads(body)["len"] == 8
            assert time.monotonic() - started < 1.0
            sock.close()
        # A body sent in pieces over half a second is read by the event loop; the thread gets it whole.
        sock = h.connect()
        data = request(body=b"y" * 3000)
        for at in range(0, len(data), 500):
            sock.sendall(data[at:at + 500])
            time.sleep(0.1)  # the client's own pacing
        status, _, body = response(sock)
        assert status == 200 and json.loads(body)["len"] == 3000
        assert json.loads(body)["read_ms"] < 50, "the thread waited for the client"
        for s in slow + [sock]:
            s.close()


def test_a_request_not_complete_by_its_deadline_gets_408_and_the_connection_is_closed(short, caplog):
    caplog.set_level(logging.DEBUG, logger="tq_mw_thehive.intake")
    with Harness() as h:
        headers, body, idle = h.connect(), h.connect(), h.connect()
        headers.sendall(b"POST /cases HTTP/1.1\r\nHost: x\r\n")
        body.sendall(request(body=b"z" * 5000)[:-4000])
        started = time.monotonic()
        for sock, what in ((headers, "headers"), (body, "body")):
            answer = ended(sock, timeout=10)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
            payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert payload["status"] == "error" and f"request {what} not complete" in payload["error"]
        assert ended(idle, timeout=10) == b""  # it sent nothing: closed without an answer
        assert time.monotonic() - started < 5
        wait_until(lambda: h.worker.nr_conns == 0, 5, "every connection closed and counted out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("closed slow connection remote=127.0.0.1 waited_for=")


def test_the_slow_connection_warning_is_one_line_then_a_count_per_interval(short, monkeypatch, caplog):
    monkeypatch.setattr(intake, "WARN_INTERVAL_S", 1.0)
    with Harness() as h:
        socks = [h.connect() for _ in range(5)]
        for sock in socks:
            sock.sendall(b"POST /cases HTTP/1.1\r\n")
        for sock in socks:
            assert ended(sock, timeout=10).startswith(b"HTTP/1.1 408")
        wait_until(lambda: any("more slow connections" in r.getMessage() for r in caplog.records), 5,
                   "the summary line")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2
    assert lines[1].startswith("closed 4 more slow connections in the last ") and lines[1].endswith("(headers: 4)")


def test_a_body_that_keeps_coming_at_the_minimum_rate_is_not_cut(short):
    with Harness() as h:
        sock = h.connect()
        data = request(body=b"r" * 4000)
        sent_at = time.monotonic()
        for at in range(0, len(data), 400):  # 4,000 bytes/s for about 1 s: past the 0.5 s floor
            sock.sendall(data[at:at + 400])
            time.sleep(0.1)
        status, _, body = response(sock)
        assert status == 200 and json.loads(body)["len"] == 4000
        assert time.monotonic() - sent_at > intake.BODY_TIMEOUT_S


def test_keep_alive_pipelining_and_chunked_bodies(short):
    with Harness() as h:
        sock = h.connect()
        for i in range(5):  # one connection, one request after the other
            sock.sendall(request(body=b'{"n": %d}' % i))
            status, headers, body = response(sock)
            assert status == 200 and headers.get("connection", "").lower() != "close"
            assert json.loads(body)["body"] == '{"n": %d}' % i
        sock.sendall(request(body=b"first") + request(body=b"second!"))  # pipelined, in one segment
        fp = sock.makefile("rb")
        assert json.loads(response(sock, fp=fp)[2])["body"] == "first"
        assert json.loads(response(sock, fp=fp)[2])["body"] == "second!"
        chunked = (b"POST /cases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")
        for at in range(0, len(chunked), 9):
            sock.sendall(chunked[at:at + 9])
            time.sleep(0.01)
        status, _, body = response(sock, fp=fp)
        assert status == 200 and json.loads(body)["body"] == "abcdefg"
        sock.close()


def test_expect_100_continue_is_answered_once_before_the_body(short):
    with Harness() as h:
        sock = h.connect()
        data = request(body=b"c" * 300, extra=b"Expect: 100-continue\r\n")
        head, body = data.split(b"\r\n\r\n", 1)
        sock.sendall(head + b"\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        status, _, answer = response(sock)
        assert status == 200 and json.loads(answer)["len"] == 300  # and no second 100 before it
        sock.close()


def test_large_refused_bodies_and_closed_connections_do_not_stall_the_loop(short):
    """A refusal with ``Connection: close`` drains the client's bytes without blocking the event
    loop (gthread's own graceful close blocks it up to 2 s per connection)."""
    with Harness() as h:
        holders = []
        for _ in range(4):
            sock = h.connect()
            sock.sendall(request(path="/auth", body=b"u" * 100_000))  # > 64 KiB: 401 and close
            status, headers, _ = response(sock)
            assert status == 401 and headers["connection"] == "close"
            holders.append(sock)  # never closed by the client
        sock = h.connect()
        started = time.monotonic()
        sock.sendall(request())
        assert response(sock)[0] == 200
        assert time.monotonic() - started < 0.5
        for s in holders + [sock]:
            s.close()


def test_buffers_beyond_the_budget_wait_and_resume(short, monkeypatch):
    monkeypatch.setattr(intake, "BUFFER_BUDGET", 300_000)
    monkeypatch.setattr(intake, "BUFFER_SMALL", 50_000)
    monkeypatch.setattr(intake, "HEADER_TIMEOUT_S", 10.0)
    monkeypatch.setattr(intake, "BODY_TIMEOUT_S", 10.0)
    intake.configure(200_000)
    try:
        with Harness() as h:
            w = h.worker
            assert w.big_places == 1
            big = [h.connect() for _ in range(4)]
            bodies = [request(body=bytes([65 + i]) * 150_000) for i in range(4)]
            for sock, data in zip(big, bodies):
                sock.sendall(data[:120_000])
            wait_until(lambda: w.buffered >= 4 * 120_000, 5, "the first parts buffered")
            big[0].sendall(bodies[0][120_000:130_000])  # the first takes the one place, unfinished
            wait_until(lambda: len(w.big) == 1, 5, "the big-request place taken")
            for sock, data in zip(big[1:], bodies[1:]):
                sock.sendall(data[120_000:])
            wait_until(lambda: len(w.paused) == 3, 5, "the others to wait for the place")
            small = h.connect()  # a webhook still gets through meanwhile
            small.sendall(request())
            assert response(small)[0] == 200
            big[0].sendall(bodies[0][130_000:])
            for i, sock in enumerate(big):
                status, _, body = response(sock)
                assert status == 200 and json.loads(body)["len"] == 150_000
                assert json.loads(body)["body"] == chr(65 + i) * 40
            assert not w.paused
            wait_until(lambda: w.buffered == 0, 5, "every buffer released")
            for s in big + [small]:
                s.close()
    finally:
        intake.configure(intake.DEFAULT_MAX_BODY)


def test_a_header_section_too_large_is_refused_with_431(short):
    with Harness() as h:
        sock = h.connect()
        limit = h.worker.limits.header_section
        sock.sendall(b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * (limit + 100))
        answer = ended(sock, timeout=10)
        assert answer.startswith(b"HTTP/1.1 431 ") and b'"status": "error"' in answer


def test_the_connection_limit_is_warned_about_once(short, caplog):
    with Harness(threads=2, worker_connections=4) as h:
        socks = [h.connect() for _ in range(4)]
        for sock in socks:
            sock.sendall(b"P")
        wait_until(lambda: any("connection limit reached" in r.getMessage() for r in caplog.records), 5,
                   "the connection limit warning")
        for sock in socks:
            sock.close()


def test_install_leaves_a_worker_it_cannot_serve_as_it_is(caplog, tmp_path):
    cfg = gunicorn_config.Config()
    cfg.set("certfile", str(tmp_path / "cert.pem"))
    worker = gthread.ThreadWorker(0, os.getppid(), [], None, 30, cfg, glogging.Logger(cfg))
    assert not intake.install(worker)
    assert type(worker) is gthread.ThreadWorker
    assert "slow-client protection off" in caplog.text and "TLS" in caplog.text


def test_a_graceful_stop_waits_for_bodies_at_the_minimum_rate_only(monkeypatch):
    """SIGTERM: a request still in its header section gets gthread's 2 s linger, a dribbled body
    what its rest needs at BODY_MIN_RATE, not their 10 s deadlines; a body coming fast is served."""
    monkeypatch.setattr(intake, "SWEEP_INTERVAL_S", 0.02)
    monkeypatch.setattr(intake, "LINGER_S", 0.5)
    monkeypatch.setattr(gunicorn_util, "write_error", server._json_error)
    h = Harness().__enter__()
    headers, dribbled, fast = h.connect(), h.connect(), h.connect()
    headers.sendall(b"POST /cases HTTP/1.1\r\n")
    dribbled.sendall(request(body=b"d" * 1000)[:-900])
    data = request(body=b"f" * 200_000)
    fast.sendall(data[:100_000])
    wait_until(lambda: len(h.worker.reading) == 3 and all(c.buf for c in h.worker.reading), 5, "three requests")
    stopping = time.monotonic()
    h.worker.handle_exit(None, None)
    fast.sendall(data[100_000:])
    status, headers_, _ = response(fast)
    assert status == 200 and headers_["connection"] == "close"
    for sock in (headers, dribbled):
        assert ended(sock, timeout=10).startswith(b"HTTP/1.1 408")
    h.thread.join(timeout=15)
    assert not h.thread.is_alive() and time.monotonic() - stopping < 5


def test_both_ways_of_running_install_the_intake_worker(monkeypatch):
    """The embedded server's post_worker_init and the gunicorn_conf module's are the same hook."""
    from tq_mw_thehive import gunicorn_conf
    assert gunicorn_conf.post_worker_init is server._post_worker_init
    assert gunicorn_conf.worker_class == server.WORKER_CLASS == "gthread"
    assert gunicorn_conf.worker_connections == intake.WORKER_CONNECTIONS
    monkeypatch.setattr(gunicorn_util, "write_error", gunicorn_util.write_error)  # restored afterwards
    cfg = gunicorn_config.Config()
    worker = gthread.ThreadWorker(0, os.getppid(), [], None, 30, cfg, glogging.Logger(cfg))
    worker.pid = os.getpid()
    server._post_worker_init(worker)
    assert isinstance(worker, intake.IntakeWorker) and worker.big_places >= 1
    assert gunicorn_util.write_error is server._json_error
