"""ThreatQ REST client: the calls of ``docs/threatq-api-subset.md``, tokens, retries, paging.

Why it is shaped this way:

* The sync worker must decide between "try this inbox item again later" and "this item can
  never succeed", so every failure is one of two exceptions: ``ThreatQUnavailable``
  (network, timeouts, 429/5xx after the in-call retries, authentication that keeps failing)
  or ``ThreatQPermanentError`` (ThreatQ refused the request itself: 400/403/404/409/422,
  an error body, a type name the instance does not have).
* Several gunicorn workers share one token file and a refresh token works once, so
  refreshes are serialised across processes with ``flock`` and the file is re-read under
  the lock: whoever comes second uses the tokens the first one stored. With a shared
  (PostgreSQL) state, daemons on several hosts use one set of tokens: they live in the
  database's ``meta`` table (seeded from this host's token file, written by ``configure``),
  refreshes are serialised on every host with a PostgreSQL advisory lock and the row is
  re-read under it in the same way; a refused refresh falls back to this host's token file
  when it holds other tokens (``configure`` was run again here). A database that cannot be
  reached is ``ThreatQUnavailable``, as ThreatQ itself would be.
* Nothing secret (tokens, client secret, proxy credentials) may reach an exception text or
  a log line: request errors are reported by their type name only, because requests and
  urllib3 put URLs (with the refresh token in the query) and proxy URLs into their messages.
* Some calls have no public evidence that a real ThreatQ serves them (``OPTIONAL_STEPS``, graded
  in ``docs/threatq-api-subset.md``). They go through ``_optional``: a 404/405 answer turns the
  step off for this client (one per worker process) with one warning, is reported to
  ``on_capability`` (the sync stores it for ``check`` and the status page) and raises
  ``ThreatQStepRefused``, which the sync treats as "carry on without it", never as a dead letter.
* Answers come in more than one shape in the public captures (sources with or without a TLP,
  attribute rows named by ``name`` or ``attribute.name``, consume records in any order): the
  readers below (``source_tlp``, ``attribute_name``, ...) accept every shape seen.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, TypeVar

import requests
import tenacity

from tq_mw_thehive import logs, metrics, state, state_postgres
from tq_mw_thehive.config import Config, shared_state
from tq_mw_thehive.errors import PermanentError, TransientError
from tq_mw_thehive.state_postgres import PostgresURL
from tq_mw_thehive.threatq import auth
from tq_mw_thehive.threatq.auth import _error_text as error_text

log = logging.getLogger("tq_mw_thehive.threatq")

LOCK_FILE = "threatq_tokens.lock"
SHARED_TOKENS_KEY = "threatq_tokens"   # meta row of a shared (PostgreSQL) state: Tokens.to_dict() as JSON
SHARED_TOKENS_LOCK = "threatq-tokens"  # the advisory lock serialising refreshes on every host
REFRESH_MARGIN_S = 60.0  # renew a token this close to its expiry before using it
PAGE_SIZE = 50
FIRST_WAIT_S = 0.2
PERMANENT_STATUSES = (400, 403, 404, 409, 422)
# Sub-resources asked inline with `with=` (reference §6, §2): one read instead of three.
EXPAND = "attributes,sources,tags"
_RETRY_AFTER_STATUSES = (429, 503)
_COLLECTION = re.compile(r"^[a-z][a-z0-9_]*$")
_CONFIGURE = "re-run `tq-mw-thehive configure`"
REFUSED_STATUSES = (404, 405)  # "this instance has no such call": an optional step is turned off
# A /query body only plausible for events and incidents (``title``/``value`` criteria) may also
# be refused for its content: the confirmed list filter then serves instead.
QUERY_REFUSED_STATUSES = (400, 404, 405, 422)
QUERY_MANY_VALUES = 100  # values in one bulk look-up: a body of a few KB, an answer of one or two pages
# ThreatQ's list filters (``GET /api/indicators?value=``) read a comma as "or" and ``%`` as a
# wildcard (SDK2 ``find()`` rewrites a title with a comma to ``first_part%``).
LIST_FILTER_SPECIALS = frozenset(",%")
MAX_FILTER_CHARS = 1024  # a longer value may not fit a URL (414): a wildcard on its start backs it up
URI_TOO_LONG = 414
WILDCARD_PREFIX_CHARS = 256
_TLP_NAMES = {"RED": 1, "AMBER": 2, "AMBER+STRICT": 1, "GREEN": 3, "WHITE": 4, "CLEAR": 4}
_KEY_FIELD = {"events": "title", "adversaries": "name"}  # every other collection: value

# The calls without public evidence (or version-dependent), by step name: what the sync does
# without them. ``check`` and the status page show these with the state the daemon recorded.
OPTIONAL_STEPS: Dict[str, str] = {
    "source_tlp": "a changed TLP is not written to ThreatQ; the source keeps the TLP it was created with",
    "source_list": "sources are read inline only; otherwise the source is added without reading it first",
    "tag_list": "tags are read inline only; otherwise TheHive's tags are added and none is removed",
    "tag_delete": "tags removed in TheHive stay on the ThreatQ object",
    "query:indicators": "indicators are looked up with list filters instead (commas and % made safe)",
    "query_many:indicators": "a burst's new indicators are looked up one value at a time (more API calls)",
    "query:events": "events are looked up with list filters instead (commas and % made safe)",
    "query:incident": "incidents are looked up with list filters instead (commas and % made safe)",
    "consume:indicators": "creating indicators call by call from now on (more API calls per object)",
    "consume:events": "creating events call by call from now on (more API calls per object)",
    "consume:incident": "creating incident call by call from now on (more API calls per object)",
}

T = TypeVar("T")


class ThreatQError(Exception):
    """A ThreatQ call failed; ``status`` is the HTTP status when there was one. No secrets inside."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class ThreatQPermanentError(ThreatQError, PermanentError):
    """ThreatQ refused the request itself (400/403/404/409/422, an error body, an unknown name):
    sending it again cannot help."""


class ThreatQUnavailable(ThreatQError, TransientError):
    """ThreatQ could not be reached or kept failing (connection, timeout, 429, 5xx, auth):
    the same request may well succeed later."""


class ThreatQStepRefused(ThreatQPermanentError):
    """An optional call (``OPTIONAL_STEPS``) that this instance does not serve (it answered
    404/405, now or earlier in this process): the caller carries on without the step."""

    def __init__(self, step: str, status: Optional[int]) -> None:
        super().__init__(f"ThreatQ does not serve the optional step {step} (HTTP {status})", status=status)
        self.step = step


class _Transient(Exception):
    """One attempt failed in a way worth retrying (inside a call only, never raised to callers)."""

    def __init__(self, status: Optional[int], text: str, retry_after: Optional[float] = None,
                 repeatable: bool = True) -> None:
        super().__init__(text)
        self.status, self.text, self.retry_after = status, text, retry_after
        self.repeatable = repeatable


class _Refused(Exception):
    """A token grant was answered with a refusal (status set) rather than not answered."""

    def __init__(self, status: Optional[int], text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class _NoRefreshToken(_Refused):
    """The access token expired and no refresh token is stored: nothing to ask ThreatQ."""

    def __init__(self) -> None:
        super().__init__(None, "no refresh token is stored")


def _same_tokens(a: auth.Tokens, b: auth.Tokens) -> bool:
    return (a.access_token, a.refresh_token) == (b.access_token, b.refresh_token)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _retry_after(response: requests.Response) -> Optional[float]:
    """``Retry-After`` in seconds on 429/503; an HTTP date or garbage falls back to backoff."""
    if response.status_code not in _RETRY_AFTER_STATUSES:
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _has_errors(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    data = body.get("data")
    return "errors" in body or (isinstance(data, dict) and "errors" in data)


def _same_id(a: Any, b: Any) -> bool:
    try:
        return int(a) == int(b)
    except (TypeError, ValueError):
        return False


def _int_or_none(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _tlp_of(value: Any) -> Optional[int]:
    """A TLP given as an id (1-4), a name (``AMBER``) or an object ``{id, name}``."""
    if isinstance(value, dict):
        return _tlp_of(value.get("id")) or _tlp_of(value.get("name"))
    if isinstance(value, str) and not value.strip().isdigit():
        return _TLP_NAMES.get(value.strip().upper())
    number = _int_or_none(value)
    return number if number in (1, 2, 3, 4) else None


def source_tlp(source: Dict[str, Any]) -> Optional[int]:
    """The TLP of one of an object's sources, wherever the answer put it: ``tlp_id`` (SDK2,
    XSOAR), ``pivot.tlp_id``, ``tlp: {id, name}``; ``None`` when the row carries none, as the
    link rows of the public captures do (``{id, source_id, name, published_at, pivot}``, SS)."""
    pivot = source.get("pivot") if isinstance(source.get("pivot"), dict) else {}
    for value in (source.get("tlp_id"), pivot.get("tlp_id"), source.get("tlp")):
        tlp = _tlp_of(value)
        if tlp is not None:
            return tlp
    return None


def source_pivot_id(source: Dict[str, Any]) -> Optional[int]:
    """The id of the object-source link (``pivot.id``; a link row without a pivot is one itself)."""
    pivot = source.get("pivot") if isinstance(source.get("pivot"), dict) else {}
    return _int_or_none(pivot.get("id", source.get("id")))


def attribute_name(attribute: Dict[str, Any]) -> Optional[str]:
    """An attribute row's name: ``name`` (XSOAR, SS) or ``attribute.name`` (SDK1 asks
    ``with=attribute`` and reads ``a["attribute"]["name"]``)."""
    name = attribute.get("name")
    if not isinstance(name, str):
        inner = attribute.get("attribute")
        name = inner.get("name") if isinstance(inner, dict) else None
    return name if isinstance(name, str) else None


def record_type_id(record: Dict[str, Any]) -> Optional[int]:
    """An indicator's type id: ``type_id``, or ``type: {id, name}`` as query answers add it."""
    type_id = _int_or_none(record.get("type_id"))
    if type_id is None and isinstance(record.get("type"), dict):
        type_id = _int_or_none(record["type"].get("id"))
    return type_id


def key_field(collection: str) -> str:
    """The field an object of ``collection`` is known by (SDK2 ``set_value``)."""
    return _KEY_FIELD.get(collection, "value")


def list_filters(value: str) -> List[str]:
    """The list-filter values that together cannot miss ``value``, on an instance that reads
    filters literally as well as on one where a comma means "or" and ``%`` is a wildcard: the
    value itself, then, for a value with those characters or too long for a URL, a wildcard
    around its longest plain part (``first_part%`` as SDK2 does). The caller keeps only exact
    matches, read from every page."""
    if not (set(value) & LIST_FILTER_SPECIALS) and len(value) <= MAX_FILTER_CHARS:
        return [value]
    parts = re.split(r"[,%]", value)
    longest = max(parts, key=len)
    wildcard = (parts[0][:WILDCARD_PREFIX_CHARS] + "%" if parts[0]
                else "%" + longest[:WILDCARD_PREFIX_CHARS] + "%" if longest else "%")
    return [value] if wildcard == value else [value, wildcard]


def _collection(name: str) -> str:
    """Collections become URL path segments: refuse anything that is not a plain name."""
    if not isinstance(name, str) or not _COLLECTION.match(name):
        raise ValueError(f"not a ThreatQ collection name: {name!r}")
    return name


class _GrantSession:
    """What ``auth``'s grants get as their session: the client's own session, with the client's
    timeout and debug line, remembering the answer's status so that a refusal (400) can be told
    from an outage (no answer, 5xx) without parsing ``ThreatQAuthError`` texts."""

    def __init__(self, client: "ThreatQClient") -> None:
        self._client = client
        self.response: Optional[requests.Response] = None

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = self._client._timeout
        session = self._client._session
        self.response = self._client._timed("POST", "/api/token", lambda: session.post(url, **kwargs))
        return self.response


class ThreatQClient:
    """One ThreatQ instance: one HTTP session, one set of tokens, cached name → id lookups.

    Safe to share between threads; each gunicorn worker process makes its own.
    """

    def __init__(self, base_url: str, client_id: str, *, client_secret: Optional[str] = None,
                 config_dir: Optional[Path] = None, verify: bool = True, proxy: Optional[str] = None,
                 timeout: Tuple[float, float] = (5.0, 30.0), attempts: int = 4,
                 max_wait_s: float = 8.0, session: Optional[requests.Session] = None,
                 shared: Optional[PostgresURL] = None) -> None:
        if not client_secret and config_dir is None:
            raise ValueError("ThreatQClient needs a client_secret or the config_dir holding the token file")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret or None
        self._config_dir = Path(config_dir) if config_dir is not None else None
        # A shared (PostgreSQL) state: the tokens live in its meta table for every host. Client
        # credentials need no store: the secret re-authenticates wherever it runs.
        self._shared = shared if shared is not None and not self._client_secret else None
        self._unsaved: Optional[Tuple[auth.Tokens, auth.Tokens]] = None  # (refreshed from, new) not yet stored
        self._verify = verify
        self._proxy = proxy or None
        self._proxies = {"http": proxy, "https": proxy} if proxy else None
        self._timeout = timeout
        self._attempts = max(1, int(attempts))
        self._max_wait_s = max(0.0, float(max_wait_s))
        self._session = session or requests.Session()
        self._sleep: Callable[[float], None] = time.sleep  # tests replace it to record waits
        self._tokens: Optional[auth.Tokens] = None
        self._token_lock = threading.Lock()
        self._lookup_lock = threading.Lock()
        self._names: Dict[str, Dict[str, int]] = {}
        self._collections: Optional[Set[str]] = None
        self._steps_lock = threading.Lock()
        self._refused: Dict[str, Optional[int]] = {}  # optional step -> the status that refused it
        self._served: Set[str] = set()                 # optional steps seen working in this process
        #: Told ``(step, served, status)`` the first time this client learns whether an optional
        #: step works; the sync stores it in the state database (``SyncState.record_capability``).
        self.on_capability: Optional[Callable[[str, bool, Optional[int]], None]] = None
        logs.add_secrets([client_secret, proxy, self._shared.password if self._shared is not None else None])

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "ThreatQClient":
        """The client the daemon uses: ``threatq.*`` settings, tokens beside ``config.yaml`` (and in
        the shared state database when ``state_db`` is PostgreSQL)."""
        tq = cfg.threatq
        kwargs.setdefault("timeout", (min(5.0, tq.timeout), tq.timeout))
        kwargs.setdefault("shared", shared_state(cfg))
        return cls(tq.base_url, tq.client_id, client_secret=tq.client_secret, config_dir=cfg.config_dir,
                   verify=tq.verify_ssl, proxy=tq.proxy, **kwargs)

    def __repr__(self) -> str:
        mode = "client credentials" if self._client_secret else "shared tokens" if self._shared else "token file"
        return f"ThreatQClient(base_url={self.base_url!r}, client_id={self.client_id!r}, auth={mode!r})"

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, *, params: Optional[Dict[str, Any]] = None,
                json: Any = None, reads: bool = False) -> Any:
        """One API call with a valid token: the parsed body, ``None`` for an empty answer (204).

        A 401 renews the token once and repeats the call once; a second 401 means the
        credentials are not usable right now, which is an outage, not a bad request.
        ``reads``: a POST that only reads (``/query``), so it may be repeated like a GET.
        """
        method = method.upper()
        path = path if path.startswith("/") else f"/{path}"
        label = f"{method} {path}"
        token = self._access_token()
        response = self._send(method, path, params, json, token, reads)
        if response.status_code == 401:
            log.info("%s: ThreatQ answered 401; renewing the access token and trying once more", label)
            token = self._after_401(token)
            response = self._send(method, path, params, json, token, reads)
            if response.status_code == 401:
                raise ThreatQUnavailable(f"{label}: ThreatQ rejected a renewed access token "
                                         f"({error_text(response)})", status=401)
        return self._parse(response, label)

    @staticmethod
    def _timed(method: str, path: str, send: Callable[[], requests.Response]) -> requests.Response:
        """Make one HTTP request and log one debug line: method, path (no query), status, ms."""
        start = time.monotonic()
        try:
            response = send()
        except requests.RequestException as exc:
            log.debug("%s %s failed: %s after %d ms", method, path, type(exc).__name__,
                      (time.monotonic() - start) * 1000)
            metrics.threatq_request(method, path, time.monotonic() - start, error=exc)
            raise
        metrics.threatq_request(method, path, time.monotonic() - start, response.status_code)
        log.debug("%s %s %s %d ms", method, path, response.status_code, (time.monotonic() - start) * 1000)
        return response

    def _send(self, method: str, path: str, params: Any, body: Any, token: str,
              reads: bool = False) -> requests.Response:
        """The request with in-call retries; returns any answer that is not worth retrying."""
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

        # A POST creates: repeating one that ThreatQ may have carried out (a read timeout, a
        # 500) could create a second object. Those surface at once as ThreatQUnavailable; the
        # event is retried later, and the sync looks the object up before creating it again.
        creates = method == "POST" and not reads

        def attempt() -> requests.Response:
            try:
                response = self._timed(method, path, lambda: self._session.request(
                    method, self.base_url + path, params=params, json=body, headers=headers,
                    timeout=self._timeout, verify=self._verify, proxies=self._proxies))
            except requests.RequestException as exc:
                not_sent = isinstance(exc, (requests.ConnectionError, requests.ConnectTimeout)) and not \
                    isinstance(exc, requests.ReadTimeout)
                raise _Transient(None, type(exc).__name__, repeatable=not creates or not_sent) from None
            if _retryable(response.status_code):
                raise _Transient(response.status_code, error_text(response), _retry_after(response),
                                 repeatable=not creates or response.status_code in _RETRY_AFTER_STATUSES)
            return response

        return self._retrying(attempt, f"{method} {path}")

    def _retrying(self, attempt: Callable[[], T], label: str) -> T:
        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self._attempts), wait=self._wait,
                                     retry=tenacity.retry_if_exception(
                                         lambda exc: isinstance(exc, _Transient) and exc.repeatable),
                                     sleep=self._sleep, reraise=True)
        try:
            return retrying(attempt)
        except _Transient as exc:
            tries = retrying.statistics.get("attempt_number", self._attempts)
            raise ThreatQUnavailable(f"{label}: ThreatQ unavailable after {tries} attempt(s) "
                                     f"({exc.text})", status=exc.status) from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Exponential backoff with jitter, or the server's ``Retry-After``; never above ``max_wait_s``."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self._max_wait_s)
        backoff = FIRST_WAIT_S * 2 ** (state.attempt_number - 1) + random.uniform(0, FIRST_WAIT_S)
        return min(backoff, self._max_wait_s)

    @staticmethod
    def _parse(response: requests.Response, label: str) -> Any:
        status = response.status_code
        if status >= 300:
            raise ThreatQPermanentError(f"{label}: {error_text(response)}", status=status)
        if status == 204 or not response.content:
            return None
        try:
            body = response.json()
        except ValueError:
            # Typically a proxy's or load balancer's page: not ThreatQ's answer, so try later.
            raise ThreatQUnavailable(f"{label}: HTTP {status} answer is not JSON", status=status) from None
        if _has_errors(body):
            raise ThreatQPermanentError(f"{label}: {error_text(response)}", status=status)
        return body

    # ---------------------------------------------------------------- tokens

    def _access_token(self) -> str:
        with self._token_lock:
            if self._tokens is None:
                self._tokens = (self._client_credentials() if self._client_secret
                                else self._load_shared() if self._shared is not None else self._load_file())
            if self._tokens.expires_at - time.time() < REFRESH_MARGIN_S:
                self._tokens = self._renew(stale=self._tokens.access_token)
            return self._tokens.access_token

    def _after_401(self, failed: str) -> str:
        with self._token_lock:
            if self._tokens is not None and self._tokens.access_token != failed:
                return self._tokens.access_token  # another thread renewed it meanwhile
            self._tokens = self._renew(stale=failed)
            return self._tokens.access_token

    def _renew(self, stale: str) -> auth.Tokens:
        """New tokens replacing ``stale``: client credentials again, or a refresh under the file
        lock (the shared database's advisory lock when the state is shared)."""
        if self._client_secret:
            return self._client_credentials()
        if self._shared is not None:
            return self._renew_shared(stale)
        with self._file_lock():
            current = self._load_file()
            if current.access_token != stale and current.expires_at - time.time() >= REFRESH_MARGIN_S:
                log.info("using the ThreatQ token another worker refreshed")
                return current
            tokens = self._refresh(current)
            try:
                auth.save_tokens(self._token_dir, tokens)
            except OSError as exc:
                log.error("cannot save the refreshed ThreatQ tokens to %s (%s); other workers will "
                          "have to re-authenticate", auth.token_path(self._token_dir), exc.strerror or exc)
            return tokens

    @property
    def _token_dir(self) -> Path:
        assert self._config_dir is not None  # __init__ ensures it without a client secret
        return self._config_dir

    def _load_file(self) -> auth.Tokens:
        """The stored tokens. Without usable ones nothing can be sent, but the events are fine:
        they wait (ThreatQUnavailable, retried) until ``configure`` is run again."""
        tokens = self._file_tokens()
        if tokens is None:
            raise ThreatQUnavailable(f"no ThreatQ tokens in {auth.token_path(self._token_dir)}; {_CONFIGURE}")
        return tokens

    def _file_tokens(self) -> Optional[auth.Tokens]:
        """This host's token file, ``None`` when there is none; damaged or unreadable: ``ThreatQUnavailable``."""
        path = auth.token_path(self._token_dir)
        try:
            tokens = auth.load_tokens(self._token_dir)
        except auth.ThreatQAuthError as exc:
            raise ThreatQUnavailable(str(exc)) from None
        except OSError as exc:
            raise ThreatQUnavailable(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); "
                                     f"{_CONFIGURE}") from None
        if tokens is not None:
            logs.add_secrets([tokens.access_token, tokens.refresh_token])
        return tokens

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Exclusive across processes (and threads: each open() is its own lock holder)."""
        path = self._token_dir / LOCK_FILE
        try:
            fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ThreatQUnavailable(f"cannot open {path} ({exc.strerror or type(exc).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ---------------------------------------------------- tokens of a shared state

    def _load_shared(self) -> auth.Tokens:
        """The tokens every host uses; when the shared database has none yet, this host's token
        file (written by ``configure``) seeds it."""
        with self._shared_errors():
            tokens = self._read_shared()
        if tokens is not None:
            return tokens
        with self._shared_lock():
            return self._read_shared() or self._seed_shared()

    def _renew_shared(self, stale: str) -> auth.Tokens:
        """A refresh under the advisory lock of every host, the stored tokens read again under it:
        whoever comes second uses what the first stored."""
        with self._shared_lock():
            current = self._read_shared() or self._seed_shared()
            if self._unsaved is not None:
                source, refreshed = self._unsaved
                if _same_tokens(current, source):  # nobody replaced them since: store ours now
                    self._write_shared(refreshed)
                    current = refreshed
                self._unsaved = None
            if current.access_token != stale and current.expires_at - time.time() >= REFRESH_MARGIN_S:
                log.info("using the ThreatQ token another process refreshed (shared state)")
                return current
            try:
                tokens = self._refresh_grant(current)
            except _Refused as exc:
                tokens = self._recover_from_file(current, exc)
            try:
                self._write_shared(tokens)
            except ThreatQUnavailable as exc:
                # The refresh token is spent: keep the new tokens here and store them at the next renewal.
                self._unsaved = (current, tokens)
                log.error("cannot store the refreshed ThreatQ tokens in the shared state database (%s); "
                          "other hosts will have to wait until this one stores them", exc)
            return tokens

    def _recover_from_file(self, current: auth.Tokens, refused: _Refused) -> auth.Tokens:
        """ThreatQ refused the shared tokens: if ``configure`` was run again on this host, its
        token file holds other tokens, which replace the shared ones; else the refusal stands."""
        try:
            mine = self._file_tokens()
        except ThreatQUnavailable:
            mine = None
        if mine is None or _same_tokens(mine, current):
            raise self._refusal(refused) from None
        log.warning("ThreatQ refused to refresh the shared tokens (%s); using the tokens in %s instead",
                    refused.text, auth.token_path(self._token_dir))
        if mine.expires_at - time.time() >= REFRESH_MARGIN_S:
            return mine
        try:
            return self._refresh_grant(mine)
        except _Refused as exc:
            raise self._refusal(exc) from None

    def _seed_shared(self) -> auth.Tokens:
        """Under the lock, the shared database having no tokens: this host's file's, stored there."""
        path = auth.token_path(self._token_dir)
        tokens = self._file_tokens()
        if tokens is None:
            raise ThreatQUnavailable(f"no ThreatQ tokens in the shared state database nor in {path}; "
                                     f"{_CONFIGURE}")
        self._write_shared(tokens)
        log.info("stored the ThreatQ tokens of %s in the shared state database", path)
        return tokens

    def _shared_db(self) -> Any:
        assert self._shared is not None
        return state_postgres.database(self._shared, state.BUSY_TIMEOUT_S)

    def _read_shared(self) -> Optional[auth.Tokens]:
        """The shared tokens, ``None`` when there are none (or they are damaged: seeded again)."""
        with self._shared_errors():
            row = self._shared_db().execute("SELECT value FROM meta WHERE key = ?", (SHARED_TOKENS_KEY,)).fetchone()
        if row is None or row["value"] is None:
            return None
        try:
            tokens = auth.Tokens.from_dict(json.loads(row["value"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("the ThreatQ tokens in the shared state database are damaged (%s); "
                        "taking this host's token file instead", type(exc).__name__)
            return None
        logs.add_secrets([tokens.access_token, tokens.refresh_token])
        return tokens

    def _write_shared(self, tokens: auth.Tokens) -> None:
        logs.add_secrets([tokens.access_token, tokens.refresh_token])
        with self._shared_errors():
            state.set_meta(self._shared_db(), SHARED_TOKENS_KEY, json.dumps(tokens.to_dict()))

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """The advisory lock serialising token refreshes of every process on every host."""
        assert self._shared is not None
        with self._shared_errors():
            with state_postgres.session_locks(self._shared, [SHARED_TOKENS_LOCK], state_postgres.LOCK_WAIT_S):
                yield

    @contextmanager
    def _shared_errors(self) -> Iterator[None]:
        """A database error (``sqlite3.Error``, whichever engine) is ``ThreatQUnavailable``:
        retried later, like ThreatQ being down; no password or token in its text."""
        try:
            yield
        except sqlite3.Error as exc:
            text = str(exc) or type(exc).__name__
            password = self._shared.password if self._shared is not None else None
            if password:
                text = text.replace(password, "***")
            raise ThreatQUnavailable(f"the ThreatQ tokens in the shared state database {self._shared} "
                                     f"cannot be used ({logs.redact(text)})") from None

    # ------------------------------------------------------------- token grants

    def _refresh(self, current: auth.Tokens) -> auth.Tokens:
        try:
            return self._refresh_grant(current)
        except _Refused as exc:
            raise self._refusal(exc) from None

    def _refresh_grant(self, current: auth.Tokens) -> auth.Tokens:
        """A refresh of ``current``; ``_Refused`` when ThreatQ refused it or there is no refresh token."""
        if not current.refresh_token:
            raise _NoRefreshToken()
        tokens = self._grant(lambda s: auth.refresh_grant(self.base_url, current, verify=self._verify,
                                                          proxy=self._proxy, session=s))
        log.info("refreshed the ThreatQ access token")
        return tokens

    @staticmethod
    def _refusal(exc: _Refused) -> ThreatQUnavailable:
        """What a refused refresh is for the caller, logged with the fix."""
        if isinstance(exc, _NoRefreshToken):
            log.error("no ThreatQ refresh token is stored; %s", _CONFIGURE)
            return ThreatQUnavailable("the ThreatQ access token expired and no refresh token is stored; "
                                      f"{_CONFIGURE}")
        log.error("ThreatQ refused to refresh the access token (%s); %s", exc.text, _CONFIGURE)
        return ThreatQUnavailable(f"ThreatQ refused to refresh the access token ({exc.text}); "
                                  f"{_CONFIGURE}", status=exc.status)

    def _client_credentials(self) -> auth.Tokens:
        secret = self._client_secret or ""
        try:
            return self._grant(lambda s: auth.client_credentials_grant(
                self.base_url, self.client_id, secret, verify=self._verify, proxy=self._proxy, session=s))
        except _Refused as exc:
            log.error("ThreatQ refused the client credentials (%s); check threatq.client_id and "
                      "threatq.client_secret", exc.text)
            raise ThreatQUnavailable(f"ThreatQ refused the client credentials ({exc.text})",
                                     status=exc.status) from None

    def _grant(self, call: Callable[[Any], auth.Tokens]) -> auth.Tokens:
        """Run one of ``auth``'s grants with the retry policy; a refusal raises ``_Refused``."""
        session = _GrantSession(self)

        def attempt() -> auth.Tokens:
            session.response = None  # a failed attempt must not be judged by the previous answer
            try:
                return call(session)
            except auth.ThreatQAuthError as exc:
                response = session.response
                if response is None or _retryable(response.status_code):
                    raise _Transient(response.status_code if response is not None else None, str(exc),
                                     _retry_after(response) if response is not None else None) from None
                raise _Refused(response.status_code, str(exc)) from None

        tokens = self._retrying(attempt, "POST /api/token")
        logs.add_secrets([tokens.access_token, tokens.refresh_token])
        return tokens

    # --------------------------------------------------------------- helpers

    def _data(self, body: Any, label: str) -> Any:
        if not isinstance(body, dict) or "data" not in body:
            raise ThreatQPermanentError(f"{label}: ThreatQ answered without a data envelope")
        return body["data"]

    def _one(self, body: Any, label: str) -> Dict[str, Any]:
        """The object of an answer whose ``data`` is an object or (indicators, links) an array of one."""
        data = self._data(body, label)
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return data[0]
        if isinstance(data, dict):
            return data
        raise ThreatQPermanentError(f"{label}: ThreatQ answered no object")

    def _list(self, body: Any, label: str) -> List[Dict[str, Any]]:
        data = self._data(body, label)
        if not isinstance(data, list):
            raise ThreatQPermanentError(f"{label}: ThreatQ answered {type(data).__name__}, not a list")
        return data

    def _get_all(self, path: str, params: Optional[Dict[str, Any]] = None,
                 query: Any = None) -> List[Dict[str, Any]]:
        """Every item of a list, page by page, until ``offset + len(data) >= total``; with
        ``query``, of ``POST {path}`` carrying it (the ``/query`` endpoints page the same way)."""
        items: List[Dict[str, Any]] = []
        offset = 0
        method = "GET" if query is None else "POST"
        while True:
            body = self.request(method, path, params={**(params or {}), "limit": PAGE_SIZE, "offset": offset},
                                json=query, reads=True)
            page = self._list(body, f"{method} {path}")
            items.extend(page)
            try:
                total = int(body["total"])
            except (KeyError, TypeError, ValueError):
                return items  # not a paged list: that was all of it
            if not page or offset + len(page) >= total:
                return items
            offset += len(page)

    # --------------------------------------------------------- optional steps

    def _optional(self, step: str, label: str, call: Callable[[], T],
                  refused_by: Tuple[int, ...] = REFUSED_STATUSES) -> T:
        """Run an optional call; an answer in ``refused_by`` (404/405) turns ``step`` off for this
        client with one warning and raises ``ThreatQStepRefused`` (as does every later use of
        the step). Every other error is the call's own."""
        with self._steps_lock:
            refused = step in self._refused
            status = self._refused.get(step)
        if refused:
            raise ThreatQStepRefused(step, status)
        try:
            result = call()
        except ThreatQPermanentError as exc:
            if exc.status not in refused_by:
                raise
            self._learned(step, False, exc.status, label)
            raise ThreatQStepRefused(step, exc.status) from None
        self._learned(step, True, None, label)
        return result

    def _learned(self, step: str, served: bool, status: Optional[int], label: str) -> None:
        with self._steps_lock:
            known = step in self._refused or (served and step in self._served)
            if not known:
                if served:
                    self._served.add(step)
                else:
                    self._refused[step] = status
        if known:
            return
        if not served:
            log.warning("ThreatQ answered %s to %s: %s", status, label, OPTIONAL_STEPS.get(step, step))
        if self.on_capability is not None:
            self.on_capability(step, served, status)

    def refused_steps(self) -> Dict[str, Optional[int]]:
        """The optional steps this client turned off, with the status that refused each."""
        with self._steps_lock:
            return dict(self._refused)

    # --------------------------------------------------------------- lookups

    def _id_for(self, path: str, kind: str, name: str) -> int:
        with self._lookup_lock:
            if path not in self._names:
                self._names[path] = {str(item["name"]): int(item["id"]) for item in self._get_all(path)
                                     if isinstance(item, dict) and "name" in item and "id" in item}
            ids = self._names[path]
        if name in ids:
            return ids[name]
        folded = {key.casefold(): value for key, value in ids.items()}
        if name.casefold() in folded:
            return folded[name.casefold()]
        raise ThreatQPermanentError(f"ThreatQ has no {kind} named {name!r} (it has: {', '.join(sorted(ids))})")

    def indicator_type_id(self, name: str) -> int:
        return self._id_for("/api/indicator/types", "indicator type", name)

    def indicator_status_id(self, name: str) -> int:
        return self._id_for("/api/indicator/statuses", "indicator status", name)

    def event_type_id(self, name: str) -> int:
        return self._id_for("/api/event/types", "event type", name)

    def has_collection(self, collection: str) -> bool:
        """Whether the instance has this object kind (the ``incident`` custom object is optional)."""
        with self._lookup_lock:
            if self._collections is None:
                self._collections = {str(item.get("collection")) for item in self._get_all("/api/objects")
                                     if isinstance(item, dict)}
            return collection in self._collections

    # --------------------------------------------------------------- objects

    def find(self, collection: str, key: str, expand: bool = False,
             match: Optional[Callable[[Dict[str, Any]], bool]] = None) -> List[Dict[str, Any]]:
        """Every object of ``collection`` whose identifying field (``key_field``) is exactly
        ``key`` (and that ``match`` accepts), read from every page.

        ``POST /api/{collection}/query`` with the value as criteria first (XSOAR, Siemplify,
        stix-shifter; SDK1's threat library for any collection): a JSON body reads commas, ``%``,
        quotes and any length literally. An instance without it (404/405), or that does not take
        the criteria (400/422), is asked through the list filter instead, with ``list_filters``
        so that neither a literal nor a comma/wildcard reading can miss. Either way only exact
        matches count: ThreatQ's own matching may be looser (case, substrings, wildcards)."""
        field = key_field(collection)
        params = {"with": EXPAND} if expand else {}
        path = f"/api/{_collection(collection)}"

        def exact(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
            return [i for i in items if isinstance(i, dict) and i.get(field) == key and (match is None or match(i))]

        try:
            return exact(self._optional(f"query:{collection}", f"POST {path}/query", lambda: self._get_all(
                f"{path}/query", params, query={"criteria": {field: key}}), QUERY_REFUSED_STATUSES))
        except ThreatQStepRefused:
            pass
        for value in list_filters(key):
            try:
                found = exact(self._get_all(path, {field: value, **params}))
            except ThreatQPermanentError as exc:
                if exc.status != URI_TOO_LONG:
                    raise
                continue  # the value did not fit the URL: the wildcard on its start comes next
            if found:
                return found
        return []

    def find_indicators(self, values: List[str], expand: bool = False,
                        chunk: int = QUERY_MANY_VALUES) -> Dict[Tuple[str, int], Dict[str, Any]]:
        """The indicators with any of ``values`` in a few calls, by (value, type id), the first
        made of each: ``POST /api/indicators/query`` with ``{"+or": [{"value": v}, …]}`` criteria,
        ``chunk`` values a call. [guess] ``+or`` in ``/query`` criteria has no public ThreatQ
        capture (the simulator serves it): an instance that refuses it (400/404/405/422) turns
        the step off, and the caller looks each value up alone (``find_indicator``). Only exact
        matches count, so a looser reading of the criteria can cost calls, never a wrong match."""
        found: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
        wanted = list(dict.fromkeys(values))
        params = {"with": EXPAND} if expand else {}
        for start in range(0, len(wanted), chunk):
            part = wanted[start:start + chunk]
            query = {"criteria": {"+or": [{"value": v} for v in part]}}
            records = self._optional("query_many:indicators", "POST /api/indicators/query (+or)",
                                     lambda: self._get_all("/api/indicators/query", params, query=query),
                                     QUERY_REFUSED_STATUSES)
            keep = set(part)
            for record in records:
                type_id = record_type_id(record) if isinstance(record, dict) else None
                if type_id is not None and record.get("value") in keep:
                    found.setdefault((record["value"], type_id), []).append(record)
        return {key: _oldest(hits) for key, hits in found.items()}

    def find_indicator(self, value: str, type_id: int, expand: bool = False) -> Optional[Dict[str, Any]]:
        """The indicator of this value and type; ``expand``: with its attributes, sources and tags
        inline (``with=``), where the instance puts them there."""
        return _oldest(self.find("indicators", value, expand, lambda i: _same_id(record_type_id(i), type_id)))

    def get(self, collection: str, object_id: int, expand: bool = False) -> Dict[str, Any]:
        """One object by its id (``GET /api/{c}/{id}``, XSOAR ``search_by_id``): how the sync reads
        an object whose id it stored, without any look-up by value. 404: it was deleted."""
        path = self._sub(collection, object_id)
        return self._one(self.request("GET", path, params={"with": EXPAND} if expand else None), f"GET {path}")

    def create_indicator(self, value: str, type_id: int, status_id: int, description: str,
                         sources: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Creates without de-duplicating (see the contract): call ``find_indicator`` first."""
        body = {"value": value, "type_id": type_id, "status_id": status_id, "description": description,
                "sources": sources}
        return self._one(self.request("POST", "/api/indicators", json=body), "POST /api/indicators")

    def consume(self, collection: str, items: List[Dict[str, Any]]) -> Optional[List[Optional[Dict[str, Any]]]]:
        """Create objects with their sources, attributes, tags and relations in one call
        (``POST /api/{collection}/consume``, reference §2): per item sent, the answer's record for
        it, matched by value (indicators: and type) or title as SDK2's ``bulk_upload`` does, never
        by position; ``None`` for an item the answer does not name (the caller looks it up).

        ``None`` as a whole when the instance has no such endpoint for the collection (404/405:
        older versions name the indicators' one ``/consume/new``): the caller then creates call by
        call, and this process does not ask again. [guess] consume merges into an existing object:
        only call it for objects the look-up did not find, as the plain create path does. Items
        carry no ``normalize`` flag (see the contract): ThreatQ keeps the value as sent, so the
        exact look-ups find it again.
        """
        path = f"/api/{_collection(collection)}/consume"
        label = f"POST {path}"
        try:
            body = self._optional(f"consume:{collection}", label,
                                  lambda: self.request("POST", path, json=items))
        except ThreatQStepRefused:
            return None
        data = body.get("data") if isinstance(body, dict) else None
        records = [r for r in data if isinstance(r, dict) and _int_or_none(r.get("id")) is not None] \
            if isinstance(data, list) else []
        return [_record_for(collection, item, records) for item in items]

    def update_indicator(self, indicator_id: int, **fields: Any) -> Dict[str, Any]:
        path = f"/api/indicators/{int(indicator_id)}"
        return self._one(self.request("PUT", path, json=fields), f"PUT {path}")

    def find_event(self, title: str) -> Optional[Dict[str, Any]]:
        return _oldest(self.find("events", title))

    def create_event(self, title: str, type_id: int, happened_at: str, description: str,
                     sources: List[Dict[str, Any]]) -> Dict[str, Any]:
        body = {"title": title, "type_id": type_id, "happened_at": happened_at, "description": description,
                "sources": sources}
        return self._one(self.request("POST", "/api/events", json=body), "POST /api/events")

    def update_event(self, event_id: int, expand: bool = False, **fields: Any) -> Dict[str, Any]:
        """The updated event; ``expand``: with its attributes, sources and tags inline."""
        path = f"/api/events/{int(event_id)}"
        params = {"with": EXPAND} if expand else None
        return self._one(self.request("PUT", path, params=params, json=fields), f"PUT {path}")

    def find_incident(self, value: str) -> Optional[Dict[str, Any]]:
        return _oldest(self.find("incident", value))

    def create_incident(self, value: str, description: str, sources: List[Dict[str, Any]]) -> Dict[str, Any]:
        body = {"value": value, "description": description, "sources": sources}
        return self._one(self.request("POST", "/api/incident", json=body), "POST /api/incident")

    def update_incident(self, incident_id: int, expand: bool = False, **fields: Any) -> Dict[str, Any]:
        """The updated incident; ``expand``: with its attributes, sources and tags inline."""
        path = f"/api/incident/{int(incident_id)}"
        params = {"with": EXPAND} if expand else None
        return self._one(self.request("PUT", path, params=params, json=fields), f"PUT {path}")

    def search(self, query: str, limit: int = 50) -> List[Dict[str, Any]]:
        """One page of keyword search (substring match): ``limit`` is the most the caller wants."""
        body = self.request("GET", "/api/search", params={"query": query, "limit": int(limit)})
        return self._list(body, "GET /api/search")

    # ---------------------------------------------------------- sub-resources

    def _sub(self, collection: str, object_id: int, *rest: Any) -> str:
        parts = [_collection(collection), str(int(object_id))] + [str(p) for p in rest]
        return "/api/" + "/".join(parts)

    def attributes(self, collection: str, object_id: int) -> List[Dict[str, Any]]:
        """The object's attribute rows; ``with=attribute`` as SDK1 asks, so that a row names its
        attribute either way (``attribute_name`` reads both)."""
        return self._get_all(self._sub(collection, object_id, "attributes"), {"with": "attribute"})

    def add_attribute(self, collection: str, object_id: int, name: str, value: str,
                      sources: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        path = self._sub(collection, object_id, "attributes")
        body: Dict[str, Any] = {"name": name, "value": value}
        if sources:
            body["sources"] = sources
        return self._one(self.request("POST", path, json=body), f"POST {path}")

    def update_attribute(self, collection: str, object_id: int, attribute_id: int, value: str) -> Dict[str, Any]:
        path = self._sub(collection, object_id, "attributes", int(attribute_id))
        return self._one(self.request("PUT", path, json={"value": value}), f"PUT {path}")

    def delete_attribute(self, collection: str, object_id: int, attribute_id: int) -> None:
        self.request("DELETE", self._sub(collection, object_id, "attributes", int(attribute_id)))

    def tags(self, collection: str, object_id: int) -> List[Dict[str, Any]]:
        """Optional (``tag_list``, no public evidence): ``ThreatQStepRefused`` when not served."""
        path = self._sub(collection, object_id, "tags")
        return self._optional("tag_list", f"GET {path}", lambda: self._get_all(path))

    def add_tags(self, collection: str, object_id: int, names: List[str]) -> List[Dict[str, Any]]:
        path = self._sub(collection, object_id, "tags")
        if not names:
            return []
        return self._list(self.request("POST", path, json=[{"name": n} for n in names]), f"POST {path}")

    def delete_tag(self, collection: str, object_id: int, tag_id: int) -> None:
        """Optional (``tag_delete``, no public evidence): ``ThreatQStepRefused`` when not served."""
        path = self._sub(collection, object_id, "tags", int(tag_id))
        self._optional("tag_delete", f"DELETE {path}", lambda: self.request("DELETE", path))

    def sources(self, collection: str, object_id: int) -> List[Dict[str, Any]]:
        """Optional (``source_list``, no public evidence): ``ThreatQStepRefused`` when not served."""
        path = self._sub(collection, object_id, "sources")
        return self._optional("source_list", f"GET {path}", lambda: self._get_all(path))

    def add_source(self, collection: str, object_id: int, name: str, tlp_id: Optional[int]) -> Dict[str, Any]:
        """Without a TLP the key is left out rather than sent as null, which validation may refuse."""
        path = self._sub(collection, object_id, "sources")
        body: Dict[str, Any] = {"name": name}
        if tlp_id is not None:
            body["tlp_id"] = tlp_id
        return self._one(self.request("POST", path, json=body), f"POST {path}")

    def set_source_tlp(self, collection: str, object_id: int, pivot_id: int, tlp_id: int) -> Dict[str, Any]:
        """Optional (``source_tlp``, no public evidence): ``ThreatQStepRefused`` when not served."""
        path = self._sub(collection, object_id, "sources", int(pivot_id))
        return self._optional("source_tlp", f"PUT {path}", lambda: self._one(
            self.request("PUT", path, json={"tlp_id": tlp_id}), f"PUT {path}"))

    def links(self, collection: str, object_id: int, other: str) -> List[Dict[str, Any]]:
        return self._get_all(self._sub(collection, object_id, _collection(other)))

    def link(self, collection: str, object_id: int, other: str, other_id: int) -> Dict[str, Any]:
        path = self._sub(collection, object_id, _collection(other))
        return self._one(self.request("POST", path, json={"id": int(other_id)}), f"POST {path}")

    def unlink(self, collection: str, object_id: int, other: str, pivot_ids: List[int]) -> None:
        path = self._sub(collection, object_id, _collection(other))
        if pivot_ids:
            self.request("DELETE", path, json=[int(p) for p in pivot_ids])


def _oldest(hits: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Of several objects with the same key (made before this daemon, or by hand), the first made."""
    return min(hits, key=lambda h: _int_or_none(h.get("id")) or 0) if hits else None


def _record_for(collection: str, item: Dict[str, Any], records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The consume answer's record for one item sent: same key value (and, for an indicator, no
    other type), exactly, else ignoring case (an instance that normalises case anyway)."""
    field = key_field(collection)
    sent, sent_type = item.get(field), _int_or_none(item.get("type_id"))

    def same_type(record: Dict[str, Any]) -> bool:
        answered = record_type_id(record)
        return sent_type is None or answered is None or answered == sent_type

    candidates = [r for r in records if same_type(r)]
    exact = [r for r in candidates if r.get(field) == sent]
    if exact or not isinstance(sent, str):
        return exact[0] if exact else None
    folded = [r for r in candidates if isinstance(r.get(field), str) and r[field].casefold() == sent.casefold()]
    return folded[0] if folded else None
