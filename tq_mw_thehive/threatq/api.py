"""ThreatQ REST client: the calls of ``docs/threatq-api-subset.md``, tokens, retries, paging.

Why it is shaped this way:

* The sync worker must decide between "try this inbox item again later" and "this item can
  never succeed", so every failure is one of two exceptions: ``ThreatQUnavailable``
  (network, timeouts, 429/5xx after the in-call retries, authentication that keeps failing)
  or ``ThreatQPermanentError`` (ThreatQ refused the request itself: 400/403/404/409/422,
  an error body, a type name the instance does not have).
* Several gunicorn workers share one token file and a refresh token works once, so
  refreshes are serialised across processes with ``flock`` and the file is re-read under
  the lock: whoever comes second uses the tokens the first one stored.
* Nothing secret (tokens, client secret, proxy credentials) may reach an exception text or
  a log line: request errors are reported by their type name only, because requests and
  urllib3 put URLs (with the refresh token in the query) and proxy URLs into their messages.
"""
from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, TypeVar

import requests
import tenacity

from tq_mw_thehive import logs, metrics
from tq_mw_thehive.config import Config
from tq_mw_thehive.threatq import auth
from tq_mw_thehive.threatq.auth import _error_text as error_text

log = logging.getLogger("tq_mw_thehive.threatq")

LOCK_FILE = "threatq_tokens.lock"
REFRESH_MARGIN_S = 60.0  # renew a token this close to its expiry before using it
PAGE_SIZE = 50
FIRST_WAIT_S = 0.2
PERMANENT_STATUSES = (400, 403, 404, 409, 422)
# Sub-resources asked inline with `with=` (reference §6, §2): one read instead of three.
EXPAND = "attributes,sources,tags"
_RETRY_AFTER_STATUSES = (429, 503)
_COLLECTION = re.compile(r"^[a-z][a-z0-9_]*$")
_CONFIGURE = "re-run `tq-mw-thehive configure`"

T = TypeVar("T")


class ThreatQError(Exception):
    """A ThreatQ call failed; ``status`` is the HTTP status when there was one. No secrets inside."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class ThreatQPermanentError(ThreatQError):
    """ThreatQ refused the request itself (400/403/404/409/422, an error body, an unknown name):
    sending it again cannot help."""


class ThreatQUnavailable(ThreatQError):
    """ThreatQ could not be reached or kept failing (connection, timeout, 429, 5xx, auth):
    the same request may well succeed later."""


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

    _consume_missing: frozenset = frozenset()  # collections whose consume endpoint answered 404/405

    def __init__(self, base_url: str, client_id: str, *, client_secret: Optional[str] = None,
                 config_dir: Optional[Path] = None, verify: bool = True, proxy: Optional[str] = None,
                 timeout: Tuple[float, float] = (5.0, 30.0), attempts: int = 4,
                 max_wait_s: float = 8.0, session: Optional[requests.Session] = None) -> None:
        if not client_secret and config_dir is None:
            raise ValueError("ThreatQClient needs a client_secret or the config_dir holding the token file")
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret or None
        self._config_dir = Path(config_dir) if config_dir is not None else None
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
        logs.add_secrets([client_secret, proxy])

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "ThreatQClient":
        """The client the daemon uses: ``threatq.*`` settings, tokens beside ``config.yaml``."""
        tq = cfg.threatq
        kwargs.setdefault("timeout", (min(5.0, tq.timeout), tq.timeout))
        return cls(tq.base_url, tq.client_id, client_secret=tq.client_secret, config_dir=cfg.config_dir,
                   verify=tq.verify_ssl, proxy=tq.proxy, **kwargs)

    def __repr__(self) -> str:
        mode = "client credentials" if self._client_secret else "token file"
        return f"ThreatQClient(base_url={self.base_url!r}, client_id={self.client_id!r}, auth={mode!r})"

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, *, params: Optional[Dict[str, Any]] = None,
                json: Any = None) -> Any:
        """One API call with a valid token: the parsed body, ``None`` for an empty answer (204).

        A 401 renews the token once and repeats the call once; a second 401 means the
        credentials are not usable right now, which is an outage, not a bad request.
        """
        method = method.upper()
        path = path if path.startswith("/") else f"/{path}"
        label = f"{method} {path}"
        token = self._access_token()
        response = self._send(method, path, params, json, token)
        if response.status_code == 401:
            log.info("%s: ThreatQ answered 401; renewing the access token and trying once more", label)
            token = self._after_401(token)
            response = self._send(method, path, params, json, token)
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

    def _send(self, method: str, path: str, params: Any, body: Any, token: str) -> requests.Response:
        """The request with in-call retries; returns any answer that is not worth retrying."""
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

        # A POST creates: repeating one that ThreatQ may have carried out (a read timeout, a
        # 500) could create a second object. Those surface at once as ThreatQUnavailable; the
        # event is retried later, and the sync looks the object up before creating it again.
        creates = method == "POST"

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
                self._tokens = self._client_credentials() if self._client_secret else self._load_file()
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
        """New tokens replacing ``stale``: client credentials again, or a refresh under the file lock."""
        if self._client_secret:
            return self._client_credentials()
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
        path = auth.token_path(self._token_dir)
        try:
            tokens = auth.load_tokens(self._token_dir)
        except auth.ThreatQAuthError as exc:
            raise ThreatQUnavailable(str(exc)) from None
        except OSError as exc:
            raise ThreatQUnavailable(f"{path} cannot be read ({exc.strerror or type(exc).__name__}); "
                                     f"{_CONFIGURE}") from None
        if tokens is None:
            raise ThreatQUnavailable(f"no ThreatQ tokens in {path}; {_CONFIGURE}")
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

    def _refresh(self, current: auth.Tokens) -> auth.Tokens:
        if not current.refresh_token:
            log.error("no ThreatQ refresh token is stored; %s", _CONFIGURE)
            raise ThreatQUnavailable("the ThreatQ access token expired and no refresh token is stored; "
                                     f"{_CONFIGURE}")
        try:
            tokens = self._grant(lambda s: auth.refresh_grant(self.base_url, current, verify=self._verify,
                                                              proxy=self._proxy, session=s))
        except _Refused as exc:
            log.error("ThreatQ refused to refresh the access token (%s); %s", exc.text, _CONFIGURE)
            raise ThreatQUnavailable(f"ThreatQ refused to refresh the access token ({exc.text}); "
                                     f"{_CONFIGURE}", status=exc.status) from None
        log.info("refreshed the ThreatQ access token")
        return tokens

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

    def _get_all(self, path: str, params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Every item of a list, page by page, until ``offset + len(data) >= total``."""
        items: List[Dict[str, Any]] = []
        offset = 0
        while True:
            body = self.request("GET", path, params={**(params or {}), "limit": PAGE_SIZE, "offset": offset})
            page = self._list(body, f"GET {path}")
            items.extend(page)
            try:
                total = int(body["total"])
            except (KeyError, TypeError, ValueError):
                return items  # not a paged list: that was all of it
            if not page or offset + len(page) >= total:
                return items
            offset += len(page)

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

    def find_indicator(self, value: str, type_id: int, expand: bool = False) -> Optional[Dict[str, Any]]:
        """The indicator of this value and type; ``expand``: with its attributes, sources and tags
        inline (``with=``), where the instance puts them there."""
        params = {"value": value, "with": EXPAND} if expand else {"value": value}
        for item in self._get_all("/api/indicators", params):
            if item.get("value") == value and _same_id(item.get("type_id"), type_id):
                return item
        return None

    def create_indicator(self, value: str, type_id: int, status_id: int, description: str,
                         sources: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Creates without de-duplicating (see the contract): call ``find_indicator`` first."""
        body = {"value": value, "type_id": type_id, "status_id": status_id, "description": description,
                "sources": sources}
        return self._one(self.request("POST", "/api/indicators", json=body), "POST /api/indicators")

    def consume(self, collection: str, items: List[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
        """Create objects with their sources, attributes, tags and relations in one call
        (``POST /api/{collection}/consume``, reference §2): the answer's records, in order.

        ``None`` when the instance has no such endpoint for the collection (404/405: older
        versions name the indicators' one ``/consume/new``, and the reference cannot say which
        version has which); the caller then creates call by call, and this process does not ask
        again. [guess] consume merges into an existing object (indicators: value and type):
        only call it for objects the look-up did not find, as the plain create path does.
        """
        if collection in self._consume_missing:
            return None
        path = f"/api/{_collection(collection)}/consume"
        label = f"POST {path}"
        try:
            body = self.request("POST", path, json=items)
        except ThreatQPermanentError as exc:
            if exc.status not in (404, 405):
                raise
            self._consume_missing = self._consume_missing | {collection}
            log.warning("ThreatQ answered %s to %s: creating %s call by call from now on "
                        "(more API calls per object)", exc.status, label, collection)
            return None
        records = self._list(body, label)
        if len(records) != len(items) or not all(isinstance(r, dict) and "id" in r for r in records):
            raise ThreatQUnavailable(f"{label}: the answer does not carry one record with an id per "
                                     "object sent")
        return records

    def update_indicator(self, indicator_id: int, **fields: Any) -> Dict[str, Any]:
        path = f"/api/indicators/{int(indicator_id)}"
        return self._one(self.request("PUT", path, json=fields), f"PUT {path}")

    def find_event(self, title: str) -> Optional[Dict[str, Any]]:
        return next((e for e in self._get_all("/api/events", {"title": title}) if e.get("title") == title), None)

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
        return next((i for i in self._get_all("/api/incident", {"value": value}) if i.get("value") == value), None)

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
        return self._get_all(self._sub(collection, object_id, "attributes"))

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
        return self._get_all(self._sub(collection, object_id, "tags"))

    def add_tags(self, collection: str, object_id: int, names: List[str]) -> List[Dict[str, Any]]:
        path = self._sub(collection, object_id, "tags")
        if not names:
            return []
        return self._list(self.request("POST", path, json=[{"name": n} for n in names]), f"POST {path}")

    def delete_tag(self, collection: str, object_id: int, tag_id: int) -> None:
        self.request("DELETE", self._sub(collection, object_id, "tags", int(tag_id)))

    def sources(self, collection: str, object_id: int) -> List[Dict[str, Any]]:
        return self._get_all(self._sub(collection, object_id, "sources"))

    def add_source(self, collection: str, object_id: int, name: str, tlp_id: Optional[int]) -> Dict[str, Any]:
        """Without a TLP the key is left out rather than sent as null, which validation may refuse."""
        path = self._sub(collection, object_id, "sources")
        body: Dict[str, Any] = {"name": name}
        if tlp_id is not None:
            body["tlp_id"] = tlp_id
        return self._one(self.request("POST", path, json=body), f"POST {path}")

    def set_source_tlp(self, collection: str, object_id: int, pivot_id: int, tlp_id: int) -> Dict[str, Any]:
        path = self._sub(collection, object_id, "sources", int(pivot_id))
        return self._one(self.request("PUT", path, json={"tlp_id": tlp_id}), f"PUT {path}")

    def links(self, collection: str, object_id: int, other: str) -> List[Dict[str, Any]]:
        return self._get_all(self._sub(collection, object_id, _collection(other)))

    def link(self, collection: str, object_id: int, other: str, other_id: int) -> Dict[str, Any]:
        path = self._sub(collection, object_id, _collection(other))
        return self._one(self.request("POST", path, json={"id": int(other_id)}), f"POST {path}")

    def unlink(self, collection: str, object_id: int, other: str, pivot_ids: List[int]) -> None:
        path = self._sub(collection, object_id, _collection(other))
        if pivot_ids:
            self.request("DELETE", path, json=[int(p) for p in pivot_ids])
