"""Request intake: each request is read whole in the worker's event loop before a thread takes it.

gunicorn's ``gthread`` worker hands a connection to a thread as soon as its first byte arrives,
and the thread then blocks reading the rest of the request. A client that sends one byte every
few seconds holds a thread for as long as it likes, and a handful of them hold every thread: the
webhook that TheHive sends meanwhile (and never re-sends) waits or times out.

``IntakeWorker`` is that worker with the reading moved into its event loop (``selectors``, the
main thread): a connection's bytes are received without blocking into a buffer until the request
is complete: its header section, then its body (``Content-Length`` bytes, or chunks up to the
last one and its trailers). Only then is it handed to a thread, which parses it from the buffer
(gunicorn's own parser: nothing is re-implemented there) and runs the app without waiting for the
client. A slow client costs a socket and its buffer, never a thread.

Each request has a deadline:

* ``HEADER_TIMEOUT_S`` from its first moment (accept, or the kept-alive connection turning
  readable) to the end of its header section;
* then ``BODY_TIMEOUT_S`` plus one second per ``BODY_MIN_RATE`` bytes received for the body (so
  a body that keeps coming at that rate is never cut; one that stalls is).

A connection past its deadline is answered 408 (in the JSON error shape, when it had sent
something) and closed. Bodies larger than the app accepts (``webhook.max_body_mb``, see
``configure``) are not buffered: the app refuses them from their ``Content-Length`` (413) and the
connection is closed (``server._pre_request``). Memory is bounded per worker: any connection may
buffer ``BUFFER_SMALL`` (a webhook is a few KB); beyond that a request needs one of the
``BUFFER_BUDGET // largest request`` big-request places (at least one), and waits for one, its
deadline running, while they are taken. Connections per worker are bounded by gunicorn's
``worker_connections`` (``WORKER_CONNECTIONS``). A connection closed after an answer (408,
``Connection: close``) has the client's last bytes drained in the loop, never in a blocking call
(gthread's own close blocks its loop up to 2 s per connection). On a graceful stop a request still
in its header section gets 2 s, a body as long as its rest needs at ``BODY_MIN_RATE``.

The worker is installed by ``server._post_worker_init`` (both the embedded server and
``gunicorn -c python:tq_mw_thehive.gunicorn_conf``): gunicorn still boots its ``gthread``
worker, which becomes an ``IntakeWorker`` before its loop starts. TLS, the PROXY protocol and
cleartext HTTP/2 read differently: with any of those, or a gunicorn whose ``gthread`` worker is
not the one this is written for, the worker stays plain ``gthread`` and a warning says so.
"""
from __future__ import annotations

import errno
import logging
import re
import selectors
import socket
import time
from collections import Counter
from typing import Any, Optional, Set

from gunicorn import util as gunicorn_util
from gunicorn.workers import gthread

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0          # from the request's start to the end of its header section
BODY_TIMEOUT_S = 10.0            # for the body, plus one second per BODY_MIN_RATE bytes received
BODY_MIN_RATE = 64 * 1024        # bytes/s a body must keep up, on average, after its first 10 s
WORKER_CONNECTIONS = 256         # per worker process: reading, waiting for a thread, kept alive
BUFFER_BUDGET = 64 * 1024 * 1024  # per worker, for requests larger than BUFFER_SMALL (at least one)
BUFFER_SMALL = 256 * 1024        # a connection may always buffer this much (a webhook is a few KB)
THREAD_IO_TIMEOUT_S = 30.0       # a thread's socket reads/writes (it should never wait on a read)
LINGER_S = 2.0                   # after closing our side: how long the client's bytes are drained
LINGER_MAX = 1024 * 1024         # ... and how many, before the socket is closed for good
WARN_INTERVAL_S = 60.0           # the slow-client and connection-limit warnings, per worker
DEFAULT_MAX_BODY = 10 * 1024 * 1024
GUNICORN_DRAIN = 64 * 1024       # what gunicorn drains of a body the app did not read (as in server.py)
RECV_SIZE = 256 * 1024
SWEEP_INTERVAL_S = 0.2

_max_body = DEFAULT_MAX_BODY


def configure(max_body_bytes: int) -> None:
    """The largest body the app accepts (``webhook.max_body_mb``); called by ``server.start_app``."""
    global _max_body
    _max_body = int(max_body_bytes)


# --------------------------------------------------------------------------- where a request ends

MORE, READY, REFUSE = "more", "ready", "refuse"
_BARE_LF = re.compile(rb"(?<!\r)\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CODINGS_BEFORE_CHUNKED = frozenset((b"identity", b"gzip", b"deflate", b"compress"))


class Limits:
    """gunicorn's header limits (as its parser computes them) and the body sizes worth buffering."""

    def __init__(self, cfg: Any = None, max_body: Optional[int] = None) -> None:
        line = getattr(cfg, "limit_request_line", 4094)
        fields = getattr(cfg, "limit_request_fields", 100)
        field_size = getattr(cfg, "limit_request_field_size", 8190)
        if fields <= 0 or fields > 32768:
            fields = 32768
        if field_size <= 0:
            field_size = 8190
        self.request_line = line if line > 0 else 0  # 0: unlimited, as in gunicorn
        self.field_size = field_size
        self.header_section = fields * (field_size + 2) + 4  # gunicorn's max_buffer_headers
        body = _max_body if max_body is None else max_body
        # A Content-Length body up to this is buffered whole; above it the app refuses it unread.
        self.length_body = max(body, GUNICORN_DRAIN)
        # A chunked body is buffered until it is complete or this much is decoded: the app reads
        # at most max_body of it before refusing it.
        self.chunked_body = body + GUNICORN_DRAIN


class Framing:
    """Where the HTTP/1 request at the start of a buffer ends, found as its bytes arrive.

    ``advance(buf)`` says ``MORE`` (wait for bytes), ``READY`` (hand the buffer to gunicorn's
    parser: the request is complete, or gunicorn will refuse it, or the app will refuse it
    without reading its body, all from what is buffered) or ``REFUSE`` (answer ``refusal``
    without a thread: a header section larger than gunicorn accepts). It never decides what
    gunicorn's parser would decide differently; when in doubt it says ``READY`` and lets the
    parser answer. ``head_done``, ``expect_continue`` and ``body_received`` are for the worker.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.head_done = False
        self.expect_continue = False
        self.body_received = 0
        self.refusal = (431, "Request Header Fields Too Large", "")
        self._scanned = 0             # head: where the search for its end resumes
        self._body_start = 0
        self._length: Optional[int] = None
        self._chunked = False
        self._chunk_at = 0            # chunked: where the next chunk-size line starts
        self._decoded = 0
        self._trailers = False

    def advance(self, buf: bytearray) -> str:
        if not self.head_done:
            found = self._head(buf)
            if found != MORE or not self.head_done:
                return found
        if self._chunked:
            return self._chunks(buf)
        if self._length is not None:
            self.body_received = min(len(buf) - self._body_start, self._length)
            return READY if len(buf) - self._body_start >= self._length else MORE
        return READY

    def remaining(self) -> Optional[int]:
        """Body bytes still to come, when the body has a Content-Length."""
        return None if self._length is None else self._length - self.body_received

    # ----- header section

    def _head(self, buf: bytearray) -> str:
        start = 2 if buf[:2] == b"\r\n" else 0  # one empty line before the request line is allowed
        line_end = buf.find(b"\r\n", start)
        if line_end < 0:
            if _BARE_LF.search(buf, start) or (self.limits.request_line and
                                               len(buf) - start - 2 > self.limits.request_line):
                return READY  # the parser refuses it at once (bare LF, request line too long)
            return MORE
        if _BARE_LF.search(buf, start, line_end) or \
                (self.limits.request_line and line_end - start > self.limits.request_line):
            return READY
        resume = max(line_end, self._scanned - 3)
        end = buf.find(b"\r\n\r\n", resume)
        if end < 0:
            if _BARE_LF.search(buf, max(line_end, self._scanned - 1)):
                return READY
            self._scanned = len(buf)
            if len(buf) - (line_end + 2) > self.limits.header_section:
                self.refusal = (431, "Request Header Fields Too Large",
                                f"header section larger than {self.limits.header_section} bytes")
                return REFUSE
            return MORE
        self.head_done = True
        self._body_start = end + 4
        return self._framing(bytes(buf[start:line_end]), bytes(buf[line_end + 2:end]))

    def _framing(self, request_line: bytes, fields: bytes) -> str:
        """From the header fields: the body to wait for, or READY (none, or gunicorn refuses)."""
        version = request_line.rsplit(b" ", 1)[-1]
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return READY  # refused by the parser, or not ours to guess
        lengths, codings = [], []
        for line in fields.split(b"\r\n") if fields else ():
            name, sep, value = line.partition(b":")
            if not sep:
                return READY
            name, value = name.lower(), value.strip(b" \t")
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [c.strip(b" \t").lower() for c in value.split(b",")]
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = version == b"HTTP/1.1"
        if codings:
            chunked = (codings[-1] == b"chunked" and codings.count(b"chunked") == 1 and
                       all(c in _CODINGS_BEFORE_CHUNKED for c in codings[:-1]))
            if not chunked or lengths or version != b"HTTP/1.1":
                return READY  # 400 or 501 from the parser, before any body is read
            self._chunked = True
            self._chunk_at = self._body_start
            return MORE
        if not lengths:
            return READY  # no body
        if len(lengths) > 1 or not lengths[0].isdigit():
            return READY  # 400
        length = int(lengths[0])
        if length > self.limits.length_body:
            return READY  # the app answers 413 from the header; the connection is then closed
        self._length = length
        return MORE if length else READY

    # ----- chunked body

    def _chunks(self, buf: bytearray) -> str:
        limits = self.limits
        while True:
            at = self._chunk_at
            if self._trailers:
                if buf[at:at + 2] == b"\r\n":
                    return READY
                if len(buf) - at < 2:
                    return MORE
                if buf.find(b"\r\n\r\n", at) >= 0 or len(buf) - at > limits.header_section or \
                        _BARE_LF.search(buf, at):
                    return READY
                return MORE
            line_end = buf.find(b"\r\n", at)
            if line_end < 0:
                return READY if len(buf) - at > limits.field_size else MORE
            size_field = bytes(buf[at:line_end]).split(b";", 1)[0].rstrip(b" \t")
            if not size_field or any(c not in _HEX for c in size_field):
                return READY  # the parser refuses the chunk size
            size = int(size_field, 16)
            if size == 0:
                self._trailers = True
                self._chunk_at = line_end + 2
                continue
            data_end = line_end + 2 + size
            available = min(len(buf), data_end) - (line_end + 2)
            self.body_received = self._decoded + available
            if self._decoded + available >= limits.chunked_body:
                return READY  # the app reads no more than max_body of it, and refuses it
            if len(buf) < data_end + 2:
                return MORE
            if buf[data_end:data_end + 2] != b"\r\n":
                return READY
            self._decoded += size
            self._chunk_at = data_end + 2


# --------------------------------------------------------------------------- the worker

class _IntakeSocket(socket.socket):
    """A client socket whose "blocking" mode in a thread has a timeout: a thread never waits
    for a client without end (it should not wait at all: the request is buffered first)."""

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        # gthread and this worker ask for the mode a request needs at several steps; each change
        # is a system call, so a mode the socket has already is not set again.
        if flag:
            if self.gettimeout() != THREAD_IO_TIMEOUT_S:
                self.settimeout(THREAD_IO_TIMEOUT_S)
        elif self.gettimeout() != 0.0:
            super().setblocking(False)


class IntakeConn(gthread.TConn):
    def __init__(self, worker: "IntakeWorker", cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.worker = worker
        self.buf = bytearray()
        self.framing: Optional[Framing] = None
        self.started = 0.0
        self.deadline = 0.0
        self.body_started: Optional[float] = None
        self.continue_sent = False
        self.accounted = 0
        self.drained = 0
        self.registered = False
        self.in_thread = False
        self.closed = False

    def close(self, graceful: bool = False) -> None:
        if graceful:
            # gthread's finish_request closes "gracefully" by draining for up to 2 s in its
            # event loop, blocking it; the intake worker drains without blocking instead.
            self.worker.linger(self, counted=False)
        else:
            super().close()


class IntakeWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker, reading every request whole in its event loop (module doc)."""

    _intake_ready = False

    def intake_setup(self) -> None:
        if self._intake_ready:
            return
        self._intake_ready = True
        self.limits = Limits(self.cfg)
        largest = self.limits.chunked_body + self.limits.header_section + self.limits.request_line
        self.big_places = max(1, BUFFER_BUDGET // largest)  # requests buffering beyond BUFFER_SMALL
        self.big: Set[IntakeConn] = set()
        self.buffered = 0
        self.reading: Set[IntakeConn] = set()
        self.paused: Set[IntakeConn] = set()
        self.lingering: Set[IntakeConn] = set()
        self.next_sweep = 0.0
        self.slow = Counter()
        self.slow_since: Optional[float] = None
        self.full_warned_at: Optional[float] = None
        self.stop_deadline = float("inf")  # set when a graceful stop begins
        log.debug("intake on pid=%s header_timeout_s=%g body_timeout_s=%g body_min_rate=%d "
                  "worker_connections=%d max_body=%d", self.pid, HEADER_TIMEOUT_S, BODY_TIMEOUT_S,
                  BODY_MIN_RATE, self.worker_connections, self.limits.length_body)

    def run(self) -> None:
        self.intake_setup()
        super().run()

    # ----- gthread's entry points

    def accept(self, listener: Any) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        sock = _IntakeSocket(fileno=client_sock.detach())
        conn = IntakeConn(self, self.cfg, sock, client_addr, listener.getsockname())
        self.begin(conn, fresh=True)
        if self.nr_conns >= self.worker_connections:
            self._warn_full()

    def enqueue_req(self, conn: Any) -> None:
        """gthread calls this for a kept-alive connection turning readable (or holding the start
        of its next request): read that request first."""
        if isinstance(conn, IntakeConn):
            self.begin(conn, fresh=False)
        else:
            super().enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        if isinstance(conn, IntakeConn):
            conn.in_thread = False
            self._release(conn)
        super().finish_request(conn, fs)

    def handle(self, conn: Any):
        """In a thread: the buffered request goes to gunicorn's parser, then the app."""
        if not isinstance(conn, IntakeConn):
            return super().handle(conn)
        data, conn.buf = bytes(conn.buf), bytearray()
        conn.data_ready = True
        try:
            conn.sock.setblocking(True)
            conn.init()
        except OSError:
            return False
        if data:
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any):
        if isinstance(conn, IntakeConn) and hasattr(req, "_expected_100_continue"):
            # The body was read already (with our own "100 Continue" if it was asked for), or
            # will not be read at all: gunicorn's would come too late.
            req._expected_100_continue = False
        return super().handle_request(req, conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL_S
            self._sweep(now)

    def _cap_keepalive(self, deadline: float) -> None:
        """On a graceful stop (``deadline``: gthread's linger for kept-alive connections): a request
        still in its header section by then is not waited for (a webhook's take milliseconds); a
        body of known length is waited for as long as the rest of it needs at BODY_MIN_RATE (a
        chunked one keeps its deadline), within gunicorn's graceful_timeout."""
        super()._cap_keepalive(deadline)
        self.stop_deadline = deadline
        for conn in self.reading | self.paused:
            self._set_deadline(conn)

    def _set_deadline(self, conn: IntakeConn) -> None:
        framing = conn.framing
        if framing is None or not framing.head_done or conn.body_started is None:
            conn.deadline = min(conn.started + HEADER_TIMEOUT_S, self.stop_deadline)
            return
        conn.deadline = conn.body_started + BODY_TIMEOUT_S + framing.body_received / BODY_MIN_RATE
        remaining = framing.remaining()
        if remaining is not None:
            conn.deadline = min(conn.deadline, self.stop_deadline + remaining / BODY_MIN_RATE)

    # ----- reading a request

    def begin(self, conn: IntakeConn, fresh: bool) -> None:
        """A request starts on ``conn``: new, or the next one on a kept-alive connection."""
        now = time.monotonic()
        leftover = b""
        if conn.parser is not None:
            leftover = conn.parser.unreader.take_buffered()  # pipelined behind the last request
        conn.buf = bytearray(leftover)
        self._account(conn)
        conn.framing = Framing(self.limits)
        conn.started = now
        conn.body_started = None
        self._set_deadline(conn)
        conn.continue_sent = False
        conn.sock.setblocking(False)
        self.reading.add(conn)
        if leftover:
            self._advance(conn)
        elif not fresh:
            self._on_readable(conn)  # gthread saw it readable already: most often the whole request is there
        if conn in self.reading:  # not complete yet: the loop reads the rest as it comes
            self._register(conn)

    def _register(self, conn: IntakeConn) -> None:
        if not conn.registered:
            self.poller.register(conn.sock, selectors.EVENT_READ, lambda _sock, c=conn: self._on_readable(c))
            conn.registered = True

    def _unregister(self, conn: IntakeConn) -> None:
        if conn.registered:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            conn.registered = False

    def _on_readable(self, conn: IntakeConn) -> None:
        try:
            self._read(conn)
        except Exception:  # a bug here must not end the worker, and must be seen
            log.exception("intake failed on a connection from %s; it was closed", _remote(conn))
            if not conn.in_thread:
                self._close_now(conn)

    def _read(self, conn: IntakeConn) -> None:
        if conn not in self.reading:
            return
        if len(conn.buf) >= BUFFER_SMALL and conn not in self.big:
            if len(self.big) >= self.big_places:
                self._unregister(conn)  # resumed by _release when a place is free
                self.reading.discard(conn)
                self.paused.add(conn)
                return
            self.big.add(conn)  # from here it reads to its end without waiting again
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)  # the client went away (or ended a kept-alive connection)
            return
        conn.buf += data
        self._account(conn)
        self._advance(conn)

    def _advance(self, conn: IntakeConn) -> None:
        framing = conn.framing
        found = framing.advance(conn.buf)
        if found == READY:
            self._hand_off(conn)
        elif found == REFUSE:
            status, reason, mesg = framing.refusal
            self._answer_and_close(conn, status, reason, mesg)
        elif framing.head_done:
            now = time.monotonic()
            if conn.body_started is None:
                conn.body_started = now
                if framing.expect_continue and not conn.continue_sent:
                    conn.continue_sent = True
                    try:
                        conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        pass
            self._set_deadline(conn)

    def _hand_off(self, conn: IntakeConn) -> None:
        self._unregister(conn)
        self.reading.discard(conn)
        self.paused.discard(conn)
        conn.in_thread = True
        super().enqueue_req(conn)  # gthread's: to the thread pool

    # ----- buffers

    def _account(self, conn: IntakeConn) -> None:
        self.buffered += len(conn.buf) - conn.accounted
        conn.accounted = len(conn.buf)

    def _release(self, conn: IntakeConn) -> None:
        self.buffered -= conn.accounted
        conn.accounted = 0
        self.big.discard(conn)
        if self.paused and len(self.big) < self.big_places:
            for waiting in list(self.paused):  # the first to read takes the place, the others wait again
                self.paused.discard(waiting)
                self.reading.add(waiting)
                self._register(waiting)

    # ----- ending connections

    def _drop(self, conn: IntakeConn) -> None:
        """Close a connection that is being read, at once (the client is gone or broke it)."""
        self._close_now(conn)

    def _forget(self, conn: IntakeConn) -> None:
        self._unregister(conn)
        self.reading.discard(conn)
        self.paused.discard(conn)
        conn.buf = bytearray()
        self._release(conn)

    def _close_now(self, conn: IntakeConn) -> None:
        """Close for good a connection this loop holds (being read or lingering), once."""
        if conn.closed:
            return
        conn.closed = True
        self._forget(conn)
        self.lingering.discard(conn)
        self.nr_conns -= 1
        gunicorn_util.close(conn.sock)

    def _answer_and_close(self, conn: IntakeConn, status: int, reason: str, mesg: str) -> None:
        self._forget(conn)
        try:
            # In the JSON error shape: server._post_worker_init replaced gunicorn's writer.
            gunicorn_util.write_error(conn.sock, status, reason, mesg)
        except OSError:
            pass
        self.linger(conn, counted=True)

    def linger(self, conn: IntakeConn, counted: bool) -> None:
        """Close our side now and drain what the client still sends for a while, in the event
        loop, so that the kernel does not reset the connection before the client has read the
        answer. ``counted``: the connection is still in ``nr_conns`` (gthread's finish_request
        has taken it off already), where it stays until closed for good."""
        if not counted:
            self.nr_conns += 1
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)
            return
        conn.deadline = time.monotonic() + LINGER_S
        conn.drained = 0
        self.lingering.add(conn)
        try:
            self.poller.register(conn.sock, selectors.EVENT_READ, lambda _sock, c=conn: self._drain(c))
            conn.registered = True
        except (KeyError, ValueError, OSError):
            self._close_now(conn)

    def _drain(self, conn: IntakeConn) -> None:
        for _ in range(8):
            try:
                data = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            conn.drained += len(data)
            if not data or conn.drained >= LINGER_MAX:
                self._close_now(conn)
                return

    def _sweep(self, now: float) -> None:
        for conn in [c for c in self.reading | self.paused if now >= c.deadline]:
            self._expire(conn, now)
        for conn in [c for c in self.lingering if now >= c.deadline]:
            self._close_now(conn)
        if self.slow_since is not None and now - self.slow_since >= WARN_INTERVAL_S:
            total = sum(self.slow.values())
            if total:
                log.warning("closed %d more slow connections in the last %d s (%s)", total,
                            round(now - self.slow_since), ", ".join(f"{k}: {n}" for k, n in sorted(self.slow.items())))
            self.slow_since, self.slow = None, Counter()

    def _expire(self, conn: IntakeConn, now: float) -> None:
        framing = conn.framing
        waited_for = "body" if framing is not None and framing.head_done else "headers" if conn.buf else "idle"
        if waited_for == "idle" and not self.alive:
            self._drop(conn)  # a graceful stop does not wait for connections that sent nothing
            return
        received = len(conn.buf)
        if self.slow_since is None:
            self.slow_since = now
            log.warning("closed slow connection remote=%s waited_for=%s received=%d after_s=%.1f "
                        "(request not complete within its deadline; more are counted for %d s)",
                        _remote(conn), waited_for, received, now - conn.started, WARN_INTERVAL_S)
        else:
            self.slow[waited_for] += 1
            log.debug("closed slow connection remote=%s waited_for=%s received=%d after_s=%.1f", _remote(conn),
                      waited_for, received, now - conn.started)
        if waited_for == "idle":
            self._drop(conn)  # nothing sent: nothing to answer
            return
        limit = HEADER_TIMEOUT_S if waited_for == "headers" else now - (conn.body_started or now)
        self._answer_and_close(conn, 408, "Request Timeout",
                               f"request {waited_for} not complete within {limit:.0f} s")

    def _warn_full(self) -> None:
        now = time.monotonic()
        if self.full_warned_at is None or now - self.full_warned_at >= WARN_INTERVAL_S:
            self.full_warned_at = now
            log.warning("connection limit reached pid=%s connections=%d (worker_connections): new ones wait "
                        "in the listen backlog until one ends", self.pid, self.nr_conns)


def _remote(conn: Any) -> str:
    client = getattr(conn, "client", None)
    if isinstance(client, (tuple, list)) and client:
        return str(client[0])
    return str(client or "-")


# --------------------------------------------------------------------------- installing it

_NEEDED = ("enqueue_req", "finish_request", "handle", "handle_request", "murder_pending", "_cap_keepalive",
           "accept", "run", "set_accept_enabled", "keepalived_conns", "method_queue")


def unsupported(worker: Any) -> Optional[str]:
    """Why ``worker`` cannot become an ``IntakeWorker`` (None: it can)."""
    if not isinstance(worker, gthread.ThreadWorker):
        return f"worker class {type(worker).__name__} is not gthread"
    missing = [name for name in _NEEDED if not hasattr(worker, name)]
    if not hasattr(gthread, "TConn") or not hasattr(gthread.TConn, "wait_for_data"):
        missing.append("TConn.data_ready")
    if missing:
        import gunicorn
        return (f"gunicorn {gunicorn.__version__}'s gthread worker is not the one this was written for "
                f"(no {', '.join(missing)})")
    cfg = worker.cfg
    if cfg.is_ssl:
        return "TLS is on (certfile/keyfile): terminate TLS in a reverse proxy instead"
    if str(getattr(cfg, "proxy_protocol", "off")).lower() not in ("off", "false", "none"):
        return "the PROXY protocol is on"
    if str(getattr(cfg, "http2_cleartext", "off")).lower() != "off":
        return "cleartext HTTP/2 is on"
    return None


def install(worker: Any) -> bool:
    """Make gunicorn's gthread ``worker`` an ``IntakeWorker`` (from ``post_worker_init``, before its
    loop starts). Logs a warning and leaves it as it is when it cannot."""
    if isinstance(worker, IntakeWorker):
        worker.intake_setup()
        return True
    reason = unsupported(worker)
    if reason is not None or type(worker) is not gthread.ThreadWorker:
        log.warning("slow-client protection off pid=%s: %s; a slow client can hold a thread until "
                    "gunicorn's own timeouts", worker.pid,
                    reason or f"worker class {type(worker).__name__} is not gthread's own")
        return False
    worker.__class__ = IntakeWorker
    worker.intake_setup()
    return True
