"""Read cases and observables from TheHive API v1 (reference ``thehive-webhooks.md`` §5).

Webhooks are delivered at most once, so the daemon re-reads what it needs: the
current case behind an event, a case's observables, and everything changed
since a checkpoint (catch-up after downtime). All reads go through
``POST /api/v1/query``: it is the only way to list a case's observables (there is
no GET list), and using it for single cases too keeps one request shape, one
error mapping and one paging loop. ``?name=`` only labels the request in
TheHive's logs.

Observables are always read through a case (``getCase``/``listCase`` then
``observables``), never from ``listObservable``: that source also returns alert
observables, which have no case to sync into. The one exception is a single observable named by
a thin webhook (``get_observable``, then ``case_of_observable`` when nothing else says which
case it is in; an alert's has none). Each ``page`` asks for
``extraData: ["total"]``; where TheHive answers with an ``X-Total`` header, paging
stops at that total instead of fetching a last, empty page.

Errors are mapped so that callers can decide what to do without looking at HTTP:
``TheHiveNotFound`` (the object is gone), ``TheHiveUnavailable`` (try again later:
network, 5xx after retries, or a key that TheHive refuses: an ``errors.TransientError``) and
``TheHiveRefused`` (anything else: an ``errors.PermanentError``), both ``TheHiveError``. No message, log line or ``repr`` holds the API key.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_none, wait_random_exponential

from tq_mw_thehive.config import Config
from tq_mw_thehive.errors import PermanentError, TransientError

logger = logging.getLogger("tq_mw_thehive.thehive")

QUERY_PATH = "/api/v1/query"
# The observables of every case, and only those (see iter_observables).
CASE_OBSERVABLES: List[Dict[str, Any]] = [{"_name": "listCase"}, {"_name": "observables"}]
RETRY_STATUSES = frozenset({500, 502, 503, 504})
_MASK = "***"


class TheHiveError(Exception):
    """A TheHive request failed; the message never holds the API key."""


class TheHiveRefused(TheHiveError, PermanentError):
    """TheHive refused the request itself (a 4xx other than 401/403/429) or answered something
    that is not what its API returns: asking again cannot help. ``status``: TheHive's HTTP status."""

    status: Optional[int] = None


class TheHiveNotFound(TheHiveRefused):
    """The case or observable does not exist (404, or an empty ``getCase`` result)."""

    status = 404


class TheHiveUnavailable(TheHiveError, TransientError):
    """TheHive cannot answer now: connection error, timeout, 5xx after retries, or 401/403 (bad key)."""


class _Transient(Exception):
    """Internal: one attempt failed in a way that another attempt may fix."""


class TheHiveClient:
    """A TheHive API v1 reader with one ``requests.Session``, retries and error mapping."""

    def __init__(self, url: str, api_key: Optional[str], *, organisation: Optional[str] = None,
                 verify: bool = True, timeout: Tuple[float, float] = (5.0, 30.0), attempts: int = 4,
                 max_wait_s: float = 8.0, page_size: int = 100,
                 session: Optional[requests.Session] = None) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.url = url.rstrip("/")
        self.organisation = organisation
        self.verify = verify
        self.timeout = timeout
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.page_size = page_size
        self._api_key = api_key
        self._session = session or requests.Session()
        # Sent per request rather than set on the session, so that a caller's session is not changed.
        self._headers: Dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if organisation:
            self._headers["X-Organisation"] = organisation
        # tenacity's sleep; tests replace it to record the waits instead of sleeping.
        self._sleep: Callable[[float], None] = time.sleep
        # Whether TheHive takes addTags/removeTags (TheHive 5) or only whole tag lists (4); None: not known yet.
        self.add_tags_supported: Optional[bool] = None

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> "TheHiveClient":
        """A client for ``cfg.thehive``; ``kwargs`` override the tuning defaults (timeouts, paging)."""
        hive = cfg.thehive
        return cls(hive.url, hive.api_key, organisation=hive.organisation, verify=hive.verify_ssl, **kwargs)

    def __repr__(self) -> str:
        return f"TheHiveClient(url={self.url!r}, organisation={self.organisation!r}, verify={self.verify!r})"

    # -- public reads -------------------------------------------------------------------------

    def get_case(self, case_id: str) -> dict:
        """The case in API v1 form; ``case_id`` is ``~id`` or the case number.

        TheHive answers an unknown id with an empty array (or a 404); both raise TheHiveNotFound.
        """
        found = self._query("get-case", [{"_name": "getCase", "idOrName": case_id}])
        if not found:
            raise TheHiveNotFound(f"TheHive has no case {case_id}")
        return found[0]

    def get_observable(self, observable_id: str) -> dict:
        """The observable in API v1 form (``getObservable``, TheHive-Project/TheHive
        ``controllers/v1/ObservableCtrl.scala`` ``initialQueries``; thehive4py
        ``endpoints/observable.py`` ``get``); an unknown id raises TheHiveNotFound."""
        found = self._query("get-observable", [{"_name": "getObservable", "idOrName": observable_id}])
        if not found:
            raise TheHiveNotFound(f"TheHive has no observable {observable_id}")
        return found[0]

    def get_alert(self, alert_id: str) -> dict:
        """The alert in API v1 form (``getAlert``: thehive4py 2.x ``endpoints/alert.py``); an
        unknown id raises TheHiveNotFound."""
        found = self._query("get-alert", [{"_name": "getAlert", "idOrName": alert_id}])
        if not found:
            raise TheHiveNotFound(f"TheHive has no alert {alert_id}")
        return found[0]

    def case_of_observable(self, observable_id: str) -> Optional[str]:
        """The ``_id`` of the observable's case, None for an alert's observable (the ``case``
        traversal of ``ObservableCtrl.scala`` ``extraQueries``: ``Query[Traversal.V[Observable],
        Traversal.V[Case]]("case", ...)``)."""
        found = self._query("observable-case", [{"_name": "getObservable", "idOrName": observable_id},
                                                 {"_name": "case"}])
        case_id = found[0].get("_id") if found and isinstance(found[0], dict) else None
        return case_id if isinstance(case_id, str) else None

    def iter_case_observables(self, case_id: str) -> Iterator[dict]:
        """The case's observables, oldest first, one page in memory at a time.

        A case with no observables and a case that does not exist give the same empty
        answer; when the first page is empty, ``get_case`` tells them apart so that a
        deleted case raises TheHiveNotFound instead of looking like an empty one.
        """
        ops = [{"_name": "getCase", "idOrName": case_id}, {"_name": "observables"},
               {"_name": "sort", "_fields": [{"_createdAt": "asc"}]}]
        empty = True
        for observable in self._pages("case-observables", ops):
            empty = False
            yield observable
        if empty:
            self.get_case(case_id)

    def iter_cases(self, since_ms: Optional[int] = None) -> Iterator[dict]:
        """Cases with ``_updatedAt`` or ``_createdAt`` >= ``since_ms`` (all when None), ``_updatedAt`` ascending.

        Where never-updated cases (no ``_updatedAt``) sort is up to TheHive [guess]. Offset
        paging over a set that changes while it is read can repeat a case, and can skip
        one: an update moves an already-read case to the end and shifts the rest down
        past the next ``from``. So a run's newest ``_updatedAt`` does not prove that
        nothing older was missed; overlapping windows do not fix that, a re-run does.
        """
        return self._pages("list-cases", self._listing("listCase", since_ms))

    def iter_observables(self, since_ms: Optional[int] = None) -> Iterator[dict]:
        """Case observables changed or created since ``since_ms``, as ``iter_cases``; each embeds nothing.

        Updating an observable may not bump its case's ``_updatedAt`` (reference §5), so
        catch-up has to list observables as well as cases. The query starts from the cases
        (``listCase`` then ``observables``) because ``listObservable`` also returns alert
        observables, which catch-up could only skip: in TheHive-Project/TheHive
        ``thehive/app/org/thp/thehive/controllers/v1/ObservableCtrl.scala`` ``listObservable`` is
        every visible observable, with both a ``case`` and an ``alert`` traversal. ``observables``
        applies to any case traversal, not just ``getCase`` (same repository,
        ``controllers/v1/CaseCtrl.scala`` ``extraQueries``: ``Query[Traversal.V[Case],
        Traversal.V[Observable]]("observables", ...)``). thehive4py reaches a case's observables
        only through ``getCase`` (TheHive-Project/TheHive4py ``thehive4py/endpoints/case.py``
        ``find_observables``) and has no case-only filter for ``listObservable``
        (``thehive4py/endpoints/observable.py`` ``find``, ``thehive4py/query/filters.py``); no
        ``fromCase``-style filter exists in either. [guess] TheHive 5 keeps this traversal. TheHive
        4.1 resolves it with the ids of every visible case (``has(_.relatedId, P.within(...))``),
        so there it costs more than a plain listing.
        """
        return self._pages("list-observables", self._listing(CASE_OBSERVABLES, since_ms))

    # -- write-back (writeback.enabled) -------------------------------------------------------------

    def update_tags(self, kind: str, object_id: str, add: Sequence[str], remove: Sequence[str]) -> None:
        """Add and remove tags of a case or observable (``kind``), leaving its other tags alone.

        TheHive 5: ``PATCH /api/v1/{kind}/{id}`` with ``addTags``/``removeTags`` (thehive4py 2.x
        ``InputUpdateObservable``/``InputUpdateCase``; StrangeBeeCorp/thehive4go, generated from
        TheHive 5's OpenAPI spec). TheHive 4 knows only ``tags``, which replaces the whole list
        (TheHive-Project/TheHive ``controllers/v1/Properties.scala``): when ``addTags`` is refused
        with a 400, the client reads the object's tags, changes only ours, and sends the list; it
        remembers that for the rest of the process. A tag an analyst adds between that read and
        write is lost [guess: TheHive 4 offers nothing better].
        """
        path = f"/api/v1/{kind}/{object_id}"
        if self.add_tags_supported is not False:
            body = {k: list(v) for k, v in (("addTags", add), ("removeTags", remove)) if v}
            try:
                self._request("PATCH", path, json=body)
                self.add_tags_supported = True
                return
            except TheHiveRefused as exc:
                if exc.status != 400 or self.add_tags_supported:
                    raise
                self.add_tags_supported = False
                logger.info("TheHive refused addTags/removeTags (TheHive 4): tags are written as the whole "
                            "list from now on (%s)", exc)
        current = self.get_observable(object_id) if kind == "observable" else self.get_case(object_id)
        tags = [t for t in current.get("tags") or [] if isinstance(t, str) and t not in set(remove)]
        tags += [t for t in add if t not in tags]
        self._request("PATCH", path, json={"tags": tags})

    def set_case_custom_field(self, case_id: str, name: str, value: str) -> None:
        """Set one custom field of a case, leaving the others alone: TheHive 5 adds a map's fields
        to the case's (thehive4go ``InputUpdateCaseCustomFields``); TheHive 4 replaces them all with
        a map and sets one field only by the path ``customFields.<name>`` (``Properties.scala``,
        ``CaseSrv.updateCustomField``). Which one this TheHive is comes from ``update_tags``;
        [guess] whether TheHive 5 also takes the path form is not known, so it is not sent there."""
        body = ({f"customFields.{name}": value} if self.add_tags_supported is False
                else {"customFields": {name: value}})
        self._request("PATCH", f"/api/v1/case/{case_id}", json=body)

    # -- organisation configuration (TheHive 4; `tq-mw-thehive thehive-setup`) ---------------------

    def organisation_config(self, name: str) -> Any:
        """``GET /api/config/organisation/{name}``: ``{path, defaultValue, value}`` [guess: the read side
        and its shape are not in the reference; callers must cope with a 404 or another shape]."""
        return self._request("GET", f"/api/config/organisation/{name}")

    def set_organisation_config(self, name: str, value: Any) -> Any:
        """``PUT /api/config/organisation/{name}`` with ``{"value": value}`` (an org admin's key,
        permission ``manageConfig``); TheHive's answer body, or None for 204."""
        return self._request("PUT", f"/api/config/organisation/{name}", json={"value": value})

    # -- query building and paging ------------------------------------------------------------

    @staticmethod
    def _listing(source: Union[str, List[Dict[str, Any]]], since_ms: Optional[int]) -> List[Dict[str, Any]]:
        """``source`` (a query source name, or the operations that select the set), filtered on
        ``since_ms`` and sorted by ``_updatedAt``; ``_pages`` adds the page."""
        ops: List[Dict[str, Any]] = [{"_name": source}] if isinstance(source, str) else list(source)
        if since_ms is not None:
            # Objects never updated may have a null _updatedAt, which a _gte on it alone would
            # exclude, hence the _or with _createdAt. The reference marks this as [guess].
            ops.append({"_name": "filter", "_or": [{"_gte": {"_field": "_updatedAt", "_value": since_ms}},
                                                   {"_gte": {"_field": "_createdAt", "_value": since_ms}}]})
        ops.append({"_name": "sort", "_fields": [{"_updatedAt": "asc"}]})
        return ops

    def _pages(self, label: str, ops: List[Dict[str, Any]]) -> Iterator[dict]:
        """Yield the query's results page by page (``from`` inclusive, ``to`` exclusive).

        The listing ends at a page shorter than requested (the reference's [guess]: the body
        is a bare array), or once ``to`` reaches the ``X-Total`` that TheHive sends for a page
        asking ``extraData: ["total"]``. Without that header an exact multiple costs one
        empty page, as before.
        """
        start = 0
        while True:
            end = start + self.page_size
            page, total = self._query_page(label, ops + [_page_op(start, end)])
            yield from page
            if len(page) < self.page_size or (total is not None and end >= total):
                return
            start = end

    def _query(self, label: str, ops: List[Dict[str, Any]]) -> List[dict]:
        return self._query_page(label, ops)[0]

    def _query_page(self, label: str, ops: List[Dict[str, Any]]) -> Tuple[List[dict], Optional[int]]:
        """The query's bare JSON array and the ``X-Total`` that came with it (None when absent)."""
        response = self._response("POST", QUERY_PATH, params={"name": label}, json={"query": ops})
        body = self._decode("POST", QUERY_PATH, response)
        if not isinstance(body, list):
            raise TheHiveRefused(f"TheHive answered query {label} with {type(body).__name__}, not a JSON array")
        return body, _total(response)

    # -- HTTP, retries and error mapping ------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode(method, path, self._response(method, path, **kwargs))

    def _response(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The answer after retries (not yet checked: ``_decode`` maps its status); kept whole so
        that paging can read its headers."""
        # "Full jitter": a random wait up to 0.5 s, 1 s, 2 s, ... capped at max_wait_s, so that
        # several workers that failed together do not come back together.
        wait = wait_random_exponential(multiplier=0.5, max=self.max_wait_s) if self.max_wait_s > 0 else wait_none()
        retrying = Retrying(stop=stop_after_attempt(self.attempts), wait=wait, sleep=self._sleep,
                            retry=retry_if_exception_type(_Transient), reraise=True)
        try:
            return retrying(self._send, method, path, **kwargs)
        except _Transient as exc:
            raise TheHiveUnavailable(f"TheHive {method} {path} failed after {self.attempts} attempt(s): "
                                     f"{exc}") from None

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One attempt; raises _Transient for what a retry may fix."""
        shown = _shown_path(path, kwargs.get("params"))
        started = time.monotonic()
        try:
            response = self._session.request(method, self.url + path, headers=self._headers,
                                             timeout=self.timeout, verify=self.verify, **kwargs)
        except requests.exceptions.SSLError:
            # A certificate problem does not go away by retrying.
            self._log(method, shown, "SSLError", started)
            raise TheHiveUnavailable(f"TheHive {method} {shown}: TLS verification failed for {self.url} "
                                     "(check the certificate, or thehive.verify_ssl)") from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            self._log(method, shown, type(exc).__name__, started)
            raise _Transient(f"{type(exc).__name__} talking to {self.url}") from None
        except requests.RequestException as exc:
            self._log(method, shown, type(exc).__name__, started)
            raise TheHiveUnavailable(f"TheHive {method} {shown}: {type(exc).__name__} "
                                     f"(check thehive.url {self.url!r})") from None
        self._log(method, shown, response.status_code, started)
        if response.status_code in RETRY_STATUSES:
            raise _Transient(f"HTTP {response.status_code}{self._detail(response)}")
        return response

    def _decode(self, method: str, path: str, response: requests.Response) -> Any:
        status = response.status_code
        where = f"TheHive {method} {path}"
        if status in (401, 403):
            if not self._api_key:
                problem = "no API key is configured (thehive.api_key)"
            elif self.organisation:
                # TheHive answers a user outside the X-Organisation it names with 401, like a bad key.
                problem = (f"API key refused, or the user is not in organisation {self.organisation!r} "
                           "(check thehive.api_key and thehive.organisation)")
            else:
                problem = "the API key was refused (check thehive.api_key)"
            if status == 403:
                problem = ("the API key lacks the permission"
                           + (f", or cannot act in organisation {self.organisation!r}" if self.organisation else ""))
            raise TheHiveUnavailable(f"{where}: HTTP {status}: {problem}{self._detail(response)}")
        if status == 404:
            raise TheHiveNotFound(f"{where}: HTTP 404{self._detail(response)}")
        if status == 429:
            # Not in the brief's list; the request was fine, TheHive just wants us to slow down.
            raise TheHiveUnavailable(f"{where}: HTTP 429: rate limited{self._detail(response)}")
        if status >= 400:
            refused = TheHiveRefused(f"{where}: HTTP {status}{self._detail(response)}")
            refused.status = status
            raise refused
        if status == 204 or not response.content:
            return None  # e.g. a configuration PUT answered "No Content"
        try:
            return response.json()
        except ValueError:
            raise TheHiveRefused(f"{where}: HTTP {status} with a body that is not JSON") from None

    def _detail(self, response: requests.Response) -> str:
        """``": <what TheHive said>"``, with the key masked in case it is echoed: its ``message``; else
        its ``type`` with ``errors`` (``AttributeCheckingError``) or ``error`` (``MultiError``), the
        bodies of ScalliGraph's ``ErrorHandler`` that have no message; else a short plain-text body
        (Play's client errors: "A client error occurred on ...")."""
        try:
            body = response.json()
        except ValueError:
            body = None
            text = (response.text or "").strip()
            message = text.splitlines()[0][:200] if text else ""
        else:
            message = _error_text(body)
        if not message:
            return ""
        if self._api_key:
            message = message.replace(self._api_key, _MASK)
        return f": {message[:500]}"

    @staticmethod
    def _log(method: str, path: str, status: Any, started: float) -> None:
        logger.debug("%s %s -> %s in %d ms", method, path, status, (time.monotonic() - started) * 1000)


def _error_text(body: Any) -> str:
    """What an error body says: ``message``; else ``type`` plus ``errors`` or ``error``; else ``type``."""
    if not isinstance(body, dict):
        return ""
    message = body.get("message")
    if isinstance(message, str) and message:
        return message
    kind = body.get("type") if isinstance(body.get("type"), str) else ""
    more = body.get("errors", body.get("error"))
    if more in (None, "", [], {}):
        return kind
    shown = more if isinstance(more, str) else json.dumps(more, separators=(",", ":"), default=str)
    return f"{kind}: {shown}" if kind else shown


def _page_op(start: int, end: int) -> Dict[str, Any]:
    """A ``page`` operation that also asks for the total.

    TheHive 4 counts the whole set only when ``extraData`` holds ``"total"``
    (TheHive-Project/TheHive ``thehive/app/org/thp/thehive/controllers/v1/ObservableCtrl.scala``
    ``pageQuery``: ``richPage(from, to, extraData.contains("total"))``; CaseCtrl likewise) and then
    sends it as an ``X-Total`` header, the body staying a bare array (TheHive-Project/ScalliGraph
    ``core/src/main/scala/org/thp/scalligraph/query/QueryExecutor.scala``:
    ``totalSize.fold(result)(s => result.withHeaders("X-Total" -> s.toString))``). thehive4py builds
    the same operation (TheHive-Project/TheHive4py ``thehive4py/query/page.py``: ``Paginate(start,
    end, extra_data)`` → ``{"from", "to", "extraData"}``) but never reads the header. [guess]
    TheHive 5 (closed source) answers the same way; where it does not, paging falls back to
    stopping at a short page.
    """
    return {"_name": "page", "from": start, "to": end, "extraData": ["total"]}


def _total(response: requests.Response) -> Optional[int]:
    """The ``X-Total`` header as a count; None when absent or not a non-negative integer, so that a
    header that TheHive (or a proxy) mangles only costs the old end condition."""
    value = response.headers.get("X-Total")
    if value is None:
        return None
    digits = value.strip()
    if digits.isascii() and digits.isdigit():
        return int(digits)
    logger.debug("ignoring X-Total %r: not a count", value[:40])
    return None


def _shown_path(path: str, params: Optional[Dict[str, str]]) -> str:
    if not params:
        return path
    return path + "?" + "&".join(f"{k}={v}" for k, v in params.items())
