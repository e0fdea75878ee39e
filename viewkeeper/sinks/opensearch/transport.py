"""Talking to OpenSearch: the client (:func:`make_client`), one request retried until
``unavailable_after`` (``_call``), ``_bulk`` and ``mget`` posted straight to a connection of
the client's pool (``_post``), a ``_bulk`` refused as a whole halved until each action at
fault is alone, and the texts of errors (no credentials, long words cut).

See README.md § Outcomes and errors and § Cost.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeGuard
from urllib.parse import urlsplit, urlunsplit

import orjson
from opensearchpy import JSONSerializer, OpenSearch
from opensearchpy.exceptions import (
    AuthenticationException,
    AuthorizationException,
    ConnectionError,
    SerializationError,
    TransportError,
)
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_random_exponential

from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.encoding import dumps

_NDJSON = {"content-type": "application/x-ndjson"}
_JSON = {"content-type": "application/json"}
_RETRY_STATUS = frozenset({409, 429, 500, 502, 503, 504})
_MAPPING_RACE_RESENDS = 3
_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")


class OrjsonSerializer(JSONSerializer):
    """The client's JSON serializer, reading answers with orjson (a 1000-item ``_bulk``
    answer parses ~2x faster: ~1 µs per document less on the hot path)."""

    def loads(self, s: str | bytes) -> Any:
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError as exc:
            raise SerializationError(s, exc) from exc


def make_client(hosts: Sequence[str | Mapping[str, Any]], **kwargs: Any) -> OpenSearch:
    """An :class:`OpenSearch` client the way this sink wants it: orjson for answers, the
    client's own retries off (the sink retries, bounded by ``unavailable_after``) and a
    connection pool as large as the requests the sink may have in flight. Pass
    ``http_auth`` (basic auth tuple or ``AWSV4SignerAuth``), ``connection_class``,
    ``use_ssl`` … as for ``OpenSearch(...)``."""
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("retry_on_timeout", False)
    # the sink sends requests concurrently (segments, phases, shard workers): keep their
    # connections (urllib3's default pool keeps one and reconnects for every other request)
    kwargs.setdefault("pool_maxsize", 32)
    kwargs.setdefault("serializer", OrjsonSerializer())
    return OpenSearch(hosts=list(hosts), **kwargs)


class _Action(Protocol):
    """What :meth:`_Transport._bulk` sends: an action's NDJSON lines, and the document id
    that keeps the actions of one document in one group (an apply's ``_Op``, a change-log
    append)."""

    @property
    def doc_id(self) -> str: ...

    @property
    def lines(self) -> bytes: ...


class _Transport:
    """Requests to the sink's OpenSearch (a mixin of :class:`OpenSearchSink`)."""

    name: str
    where: str
    client: OpenSearch
    request_timeout: float
    unavailable_after: float
    bulk_concurrency: int
    min_split: int
    max_bulk_bytes: int
    _pool: ThreadPoolExecutor | None
    _lock: threading.Lock
    _owns_client: bool

    def ping(self) -> None:
        self._call(
            lambda: self.client.transport.perform_request(
                "GET", "/_cluster/health", timeout=self.request_timeout
            )
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._owns_client:
            self.client.close()

    def _mget(self, index: str, ids: list[str]) -> list[dict[str, Any]]:
        resp = self._post(
            f"/{index}/_mget", {"_source_includes": "v,doc"}, dumps({"ids": ids}), _JSON
        )
        docs: list[dict[str, Any]] = resp["docs"]
        if len(docs) != len(ids):
            raise SinkError(f"mget on {index!r} answered {len(docs)} docs for {len(ids)} ids")
        return docs

    def _bulk(
        self, ops: Sequence[_Action], require_alias: bool, deadline: float, split: bool = True
    ) -> list[dict[str, Any]]:
        """One response item per op. Ops are split into ``bulk_concurrency`` groups by
        document id (so the ops of one document stay in one group, in order) and each group
        into requests of at most ``max_bulk_bytes``, sent one after the other (a request
        leaves when the previous one of its group is answered); the groups run
        concurrently."""
        params = {"require_alias": "true"} if require_alias else None
        k = self.bulk_concurrency if split and len(ops) >= self.min_split else 1
        if k > 1:
            groups: list[list[int]] = [[] for _ in range(k)]
            for i, op in enumerate(ops):
                groups[hash(op.doc_id) % k].append(i)
        else:
            groups = [list(range(len(ops)))]
        chunked = [list(self._chunks(ops, group)) for group in groups if group]
        requests = [request for chunks in chunked for request in chunks]

        def send(part: list[int], body: bytes) -> list[dict[str, Any]]:
            try:
                resp = self._call(lambda: self._post("/_bulk", params, body, _NDJSON), deadline)
            except SinkError as exc:
                cause = exc.__cause__
                if not _refused(cause):
                    raise
                # refused as a whole (over http.max_content_length, an _id over 512 bytes,
                # ...): halve until each action at fault is alone; it answers the refusal,
                # as that change's ERROR. Every level halves: at most 2n - 1 requests.
                if len(part) == 1:
                    return [_refused_item(cause, len(body))]
                half = len(part) // 2
                a, b = part[:half], part[half:]
                return send(a, b"".join(ops[i].lines for i in a)) + send(
                    b, b"".join(ops[i].lines for i in b)
                )
            return [next(iter(x.values())) for x in resp.get("items") or ()]

        def send_group(chunks: list[tuple[list[int], bytes]]) -> list[list[dict[str, Any]]]:
            # in sequence: two ops of one document may sit in two chunks of its group
            return [send(part, body) for part, body in chunks]

        if len(chunked) == 1 or not split:
            # not split: this runs in a pool worker already and must not wait on the pool
            answers = [got for chunks in chunked for got in send_group(chunks)]
        else:
            answers = [got for group in self._executor().map(send_group, chunked) for got in group]
        items: list[dict[str, Any]] = [{}] * len(ops)
        for (part, _), got in zip(requests, answers, strict=True):
            if len(got) != len(part):
                raise SinkError(f"_bulk answered {len(got)} items for {len(part)} actions")
            for i, item in zip(part, got, strict=True):
                items[i] = item
        return items

    def _chunks(
        self, ops: Sequence[_Action], group: list[int]
    ) -> Iterable[tuple[list[int], bytes]]:
        part: list[int] = []
        size = 0
        for i in group:
            n = len(ops[i].lines)
            if part and size + n > self.max_bulk_bytes:
                yield part, b"".join(ops[j].lines for j in part)
                part, size = [], 0
            part.append(i)
            size += n
        if part:
            yield part, b"".join(ops[j].lines for j in part)

    def _post(
        self, path: str, params: Mapping[str, str] | None, body: bytes, headers: Mapping[str, str]
    ) -> Any:
        """POST on the hot path (``_bulk``, ``mget``): straight to a connection of the client's
        pool, the answer read with orjson. The connection does what matters — TLS, auth
        (SigV4 signs the body it sends), compression, raising TransportError subclasses — and
        the sink retries itself (:meth:`_call`); only the transport's own retries, its
        serializer (stdlib json for answers, ~2x slower) and its per-request bookkeeping are
        skipped. A failed connection is still marked dead, so that a pool of several hosts
        moves on to the next one."""
        transport = self.client.transport
        conn = transport.get_connection()
        try:
            _, _, data = conn.perform_request(
                "POST", path, params, body, timeout=self.request_timeout, headers=headers
            )
        except ConnectionError:
            with contextlib.suppress(TransportError):
                transport.mark_dead(conn)
            raise
        transport.connection_pool.mark_live(conn)
        try:
            return orjson.loads(data) if data else {}
        except orjson.JSONDecodeError as exc:
            raise SerializationError(data, exc) from exc

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                # the segments of two phases of an apply in flight at once, for a few
                # shard workers sharing this sink
                self._pool = ThreadPoolExecutor(
                    max_workers=max(4, 4 * self.bulk_concurrency),
                    thread_name_prefix=f"viewkeeper-os-{self.name}",
                )
            return self._pool

    def _call(self, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run one request, retrying transient transport failures until the deadline
        (default: ``unavailable_after`` from now), then raise SinkUnavailable."""
        if deadline is None:
            deadline = time.monotonic() + self.unavailable_after
        remaining = max(0.0, deadline - time.monotonic())
        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_before_delay(remaining),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        try:
            return retrying(fn)
        except TransportError as exc:
            if not _is_transient(exc):
                raise SinkError(
                    f"OpenSearch sink {self.name!r} ({self.where}): {_scrub(_exc_text(exc))}"
                ) from exc
            raise SinkUnavailable(
                f"OpenSearch sink {self.name!r} ({self.where}) unavailable after "
                f"{self.unavailable_after:.1f}s: {_scrub(_exc_text(exc))}"
            ) from None


def _scrub(text: str) -> str:
    return _USERINFO_RE.sub("", text)


def _host_text(host: object) -> str:
    if isinstance(host, str):
        url = host if "://" in host else f"http://{host}"
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if isinstance(host, Mapping):
        scheme = "https" if host.get("use_ssl") or host.get("scheme") == "https" else "http"
        return f"{scheme}://{host.get('host', '?')}:{host.get('port', 9200)}"
    return "?"


def _error_text(error: object) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
    cause = error.get("caused_by")
    if isinstance(cause, Mapping):
        text += f" (caused by {cause.get('type', '?')}: {cause.get('reason', '')})"
    return text


def _mapping_race(status: int, error: object) -> bool:
    """A document refused because another request mapped the same new field meanwhile with
    another type: 400 ``illegal_argument_exception`` "mapper [n] cannot be changed from type
    [long] to [float]". Sent again it meets the field mapped and is taken (coerced); a
    refusal that stays after :data:`_MAPPING_RACE_RESENDS` resends is the document's."""
    return status == 400 and "cannot be changed from type" in _error_text(error)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError):
        return True
    if isinstance(exc, AuthenticationException | AuthorizationException):
        return True  # rotated credentials come back; report unavailable after the deadline
    if isinstance(exc, TransportError):
        status = exc.status_code
        return not isinstance(status, int) or status in _RETRY_STATUS or status == 408
    return False


def _refused(exc: BaseException | None) -> TypeGuard[TransportError]:
    """A request refused as a whole for what it holds: a 4xx other than those with a
    meaning of their own (401/403: credentials, 408: timeout, 409/429: retry), which
    :func:`_is_transient` retries."""
    if not isinstance(exc, TransportError) or _is_transient(exc):
        return False
    status = exc.status_code
    return isinstance(status, int) and 400 <= status < 500


def _refused_item(exc: TransportError, size: int) -> dict[str, Any]:
    """The answer OpenSearch cannot give for an action it refused with the whole request
    (the action was sent alone and refused)."""
    status = int(exc.status_code)
    if status == 413:
        error: dict[str, Any] = {
            "type": "request_entity_too_large",
            "reason": f"the action alone is {size} bytes, more than the node's "
            "http.max_content_length; make the document smaller",
        }
    else:
        found = _reason_of(exc.info)
        error = dict(found) if isinstance(found, Mapping) else {"type": str(exc.error)}
        error.setdefault("type", str(exc.error))
        error["reason"] = (
            f"{error.get('reason', '')} (OpenSearch refused the whole _bulk request; sent "
            "alone, this action is refused)"
        )
    return {"status": status, "error": error}


_SHOWN = 100  # characters of a long word shown in an error text (as projection.shown)
_LONG_WORD_RE = re.compile(r"\S{" + str(_SHOWN + 20) + ",}")


def _short(text: str, limit: int = 2000) -> str:
    """An error text for a message: words of more than about 100 characters (OpenSearch
    echoes a refused ``_id`` in full: up to 3 KB of item key) cut like :func:`shown`, the
    whole at most ``limit`` characters."""
    text = _LONG_WORD_RE.sub(lambda m: f"{m[0][:_SHOWN]}… ({len(m[0])} characters)", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _index_missing(error: object) -> bool:
    return isinstance(error, Mapping) and error.get("type") == "index_not_found_exception"


def _exc_text(exc: TransportError) -> str:
    if isinstance(exc, ConnectionError):
        return f"connection failed ({exc.error}: {exc.info})"
    return f"HTTP {exc.status_code} {exc.error}: {_error_text(_reason_of(exc.info))}"


def _reason_of(info: object) -> object:
    if isinstance(info, Mapping) and isinstance(info.get("error"), Mapping):
        return info["error"]
    return info
