"""Serve a WSGI app on 127.0.0.1, on a free port, in a background thread."""
from __future__ import annotations

import threading
from typing import Optional

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    """No access line per request: the simulators' callers print what matters."""

    def log_request(self, code="-", size="-") -> None:
        pass


class LoopbackServer:
    """``with LoopbackServer(app) as srv: requests.get(srv.url + "/path")``."""

    def __init__(self, app, port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True,
                                                      request_handler=_QuietHandler)
        self.port: int = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LoopbackServer":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="loopback-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
