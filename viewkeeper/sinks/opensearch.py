"""The OpenSearch sink: one document per item, versioned, with tombstones readers never see.

Why it is built the way it is — the index layout, the stored script, the phases of a batch,
owner records and tombstones, custom document ids and claims, outcomes and errors, cost — is
argued in ``opensearch/README.md`` beside this module; the docstrings below point to its
sections (``README.md § Outcomes and errors``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeGuard
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

from viewkeeper.projection.api import View
from viewkeeper.projection.entries import Document
from viewkeeper.projection.project import shown
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import (
    Change,
    Claim,
    Collision,
    NamespaceLost,
    Outcome,
    Owner,
    Result,
    SinkError,
    SinkUnavailable,
)
from viewkeeper.sinks.encoding import EncodeError, dumps

__all__ = [
    "ID_DIGEST_PREFIX",
    "LIVE_SUFFIX",
    "MAX_ID_BYTES",
    "OWNERS_SUFFIX",
    "SCRIPT_NAME",
    "OpenSearchSink",
    "OrjsonSerializer",
    "ViewIndexes",
    "item_id",
    "make_client",
    "script_source",
]

log = logging.getLogger("viewkeeper.sinks.opensearch")

MAX_ID_BYTES = 512
"""OpenSearch's limit on a document ``_id``, in UTF-8 bytes."""
ID_DIGEST_PREFIX = "vk:sha256:"
"""The start of the ``_id`` of an item key that cannot be its own id (:func:`item_id`)."""

SCRIPT_NAME = "viewkeeper-apply-v5"
"""Stored script id (after the sink's ``index_prefix``); bump N when the .painless changes."""
LIVE_SUFFIX = ".vk-live"
OWNERS_SUFFIX = ".vk-owners"
OWNERS_FORMAT = 2
"""``_meta.viewkeeper.format`` of an owner index viewkeeper makes: 2 since it holds the
view's claim too (:meth:`OpenSearchSink.read_claim`); 1 was made by older versions."""
META = "_vk"

_CLAIM_READS = 5  # reads of two claims that differ before read_claim says lost
_CLAIM_REREAD = 0.2  # seconds between them (a claim being written: a request or two)
_NDJSON = {"content-type": "application/x-ndjson"}
_JSON = {"content-type": "application/json"}
_RETRY_STATUS = frozenset({409, 429, 500, 502, 503, 504})
_MAPPING_RACE_RESENDS = 3
_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")

LIVE_MAPPINGS: dict[str, Any] = {
    "dynamic": True,
    "properties": {
        META: {
            "dynamic": False,
            "properties": {
                "v": {"type": "keyword", "index": False, "doc_values": False},
                "g": {"type": "long"},
                "item": {"type": "keyword"},
                "prev": {"type": "keyword", "index": False, "doc_values": False},
                "parked": {"type": "object", "enabled": False},
            },
        }
    },
}
OWNERS_MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "v": {"type": "keyword", "index": False, "doc_values": False},
        "g": {"type": "long"},
        "item": {"type": "keyword"},
        "doc": {"type": "keyword"},
        "pending": {"type": "keyword"},
        "prev_doc": {"type": "keyword", "index": False, "doc_values": False},
        "prev_docs": {"type": "keyword", "index": False, "doc_values": False},
        "was": {"type": "keyword", "index": False, "doc_values": False},
        "deleted_at": {"type": "date", "format": "epoch_millis"},
    },
}


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


def item_id(item_key: str) -> str:
    """The ``_id`` an item key is stored under: its owner record's id, and its document's
    id in a view with the default document id. The key itself when its UTF-8 holds at most
    :data:`MAX_ID_BYTES` (512) bytes; otherwise ``vk:sha256:`` and the 64 lower-case hex
    digits of the SHA-256 of its UTF-8 (74 characters). A short key that itself starts
    with ``vk:sha256:`` is digested too, so no two keys ever share an id. Stable: the same
    key gives the same id on every daemon and every version of viewkeeper."""
    if len(item_key) <= MAX_ID_BYTES // 4 and not item_key.startswith(ID_DIGEST_PREFIX):
        return item_key  # at most 4 UTF-8 bytes per character: no need to encode
    raw = item_key.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_ID_BYTES and not item_key.startswith(ID_DIGEST_PREFIX):
        return item_key
    return ID_DIGEST_PREFIX + hashlib.sha256(raw).hexdigest()


def script_source() -> str:
    """The painless source of the stored script (shipped next to this module)."""
    return (
        resources.files("viewkeeper.sinks")
        .joinpath("opensearch_apply.painless")
        .read_text(encoding="utf-8")
    )


@dataclass(frozen=True, slots=True)
class ViewIndexes:
    """The names standing behind one view's ``index``."""

    alias: str
    live: str
    owners: str

    @classmethod
    def of(cls, view: View, prefix: str = "") -> ViewIndexes:
        if view.index is None:
            raise ValueError(f"view {view.name!r} has no index; it is not an opensearch_view")
        alias = f"{prefix}{view.index}"
        return cls(alias, alias + LIVE_SUFFIX, alias + OWNERS_SUFFIX)


@dataclass(slots=True)
class _Plan:
    """What one change still has to do, and what it has learnt so far."""

    change: Change
    names: ViewIndexes
    doc: Document | None
    tracked: bool
    version: str
    outcome: Outcome | None = None
    error: str | None = None
    collisions: list[Collision] | None = None
    owner_moved: bool = False
    rec_v: str | None = None  # the owner record's version after the owner phase
    gone: list[str] | None = None  # documents to delete at rec_v (item-checked)
    later: list[str] | None = None  # a put's pending deletes: sent once the put is answered
    recorded: bool = False  # W1 wrote (or found) the owner record of this very change
    unpend: list[str] | None = None  # the record's pending ids: forget them once deleted
    acked: list[str] | None = None  # ids whose delete was acknowledged in this apply
    deleted: bool = False  # a delete of this change removed a document
    kept: bool = False  # a delete of this change found a newer or another item's document
    uuid: str | None = None  # the live index's uuid as known when its put was built
    key_id: str = field(default="", init=False)  # the _id of the item's owner record
    doc_key: str | None = field(default=None, init=False)  # the _id of the document put

    def __post_init__(self) -> None:
        self.key_id = item_id(self.change.item_key)
        if self.doc is not None:
            # a default id is the item key (as its owner record's id); one the view (or a
            # hand-built change) chose is used as it is
            self.doc_key = self.doc.doc_id if self.tracked else self.key_id

    def fail(self, message: str) -> None:
        self.outcome = Outcome.ERROR
        self.error = message


_Known = tuple[int, int, tuple[int, int, str], str]
"""What this sink last wrote to a document: seq_no, primary term, version key, item key."""

_Check = tuple[_Plan, str, str | None]
"""A put to post-check: its change, its document id, and the other item whose claim it
took the document from (or waits behind), to tell whether that is a collision."""


@dataclass(slots=True)
class _Op:
    plan: _Plan
    kind: str  # own | put | del | gone | fix | unpend
    doc_id: str
    lines: bytes
    payload: bytes | None = None  # a fast-path put's document, to resend it as the script
    path: str = "script"  # script | cas | create: how a put was finally sent
    cached: bool = False  # the put found this sink's last write of the document cached


@dataclass(slots=True)
class _Live:
    """Live ops built and (some) sent by :meth:`OpenSearchSink._live_send`."""

    todo: list[_Plan]
    ops: list[_Op]
    sent: list[tuple[int, int, Future[list[dict[str, Any]]]]]  # (start, end, answers)
    deadline: float


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


class OpenSearchSink:
    """One ``opensearch:`` connection of the config, serving its views (see README.md).

    ``client``: a ready :class:`opensearchpy.OpenSearch` (SigV4 or basic auth configured by
    whoever built it); without one, a client is built from ``hosts`` and ``http_auth`` with
    the client's own retries off (this class retries, bounded by ``unavailable_after``).
    """

    def __init__(
        self,
        name: str,
        client: OpenSearch | None = None,
        *,
        hosts: Sequence[str] = ("http://127.0.0.1:9200",),
        http_auth: Any = None,
        index_prefix: str = "",
        tombstone_retention: float = 48 * 3600,
        clock: Callable[[], float] = time.time,
        unavailable_after: float = 5.0,
        request_timeout: float = 30.0,
        maintenance_timeout: float = 600.0,
        retry_on_conflict: int = 5,
        max_bulk_bytes: int = 8 << 20,
        bulk_concurrency: int = 2,
        cas_cache_size: int = 100_000,
        min_split: int = 200,
        index_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.index_prefix = index_prefix
        self.tombstone_retention = tombstone_retention
        self.clock = clock
        self.unavailable_after = unavailable_after
        self.request_timeout = request_timeout
        self.maintenance_timeout = maintenance_timeout
        self.retry_on_conflict = retry_on_conflict
        self.max_bulk_bytes = max_bulk_bytes
        self.bulk_concurrency = max(1, bulk_concurrency)
        self.min_split = min_split
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.cas_cache_size = cas_cache_size
        # (uuid of the live index, document id) -> what this sink last wrote there
        self._cache: OrderedDict[tuple[str, str], _Known] = OrderedDict()
        self._uuids: dict[str, str] = {}  # view -> its live index's uuid, as last seen
        self._new_share = 0.5  # share of recent uncached puts that created their document
        self.stats: dict[str, int] = dict.fromkeys(
            ("put_script", "put_cas", "put_create", "fallback", "post_check_fix"), 0
        )
        """How puts went: the script, or a fast path (``fallback``: a fast path answered 409
        and was resent as the script); ``post_check_fix``: stale upserts undone (I3)."""
        self.index_settings = dict(index_settings or {})
        self.script_id = f"{index_prefix}{SCRIPT_NAME}"
        self._owns_client = client is None
        if client is None:
            client = make_client(hosts, http_auth=http_auth, timeout=request_timeout)
            where = [_host_text(h) for h in hosts]
        else:
            where = [_host_text(h) for h in getattr(client.transport, "hosts", None) or ()]
        self.client = client
        self.where = ", ".join(where) or "?"
        self._prepared: dict[str, ViewIndexes] = {}
        self._markers: dict[str, str] = {}  # view -> the marker its claim must hold
        # Fragments of the NDJSON lines, built once.
        sid = dumps(self.script_id)
        # what a put reads back: the holder, the item it took the document from (prev) and
        # the items whose claims wait (parked): {} from a document of one item alone
        self._put_pre = (
            b'{"scripted_upsert":true,"upsert":{},'
            b'"_source":["_vk.item","_vk.prev","_vk.parked.item"],'
            b'"script":{"id":' + sid + b',"params":{"op":"put","doc":'
        )
        self._own_pre = (
            b'{"scripted_upsert":true,"upsert":{},'
            b'"_source":["v","doc","pending","prev_docs","prev_doc"],'
            b'"script":{"id":' + sid + b',"params":{"op":"own","rec":'
        )
        self._del_pre = b'{"script":{"id":' + sid + b',"params":{"op":"del","v":'
        self._unpend_pre = b'{"script":{"id":' + sid + b',"params":{"op":"unpend","v":'
        self._keep_pre = b'{"script":{"id":' + sid + b',"params":{"op":"keep","v":'
        self._action_tail = b',"retry_on_conflict":%d,"_id":' % retry_on_conflict
        self._heads: dict[tuple[bytes, str], bytes] = {}

    # ------------------------------------------------------------------------------------
    # names, setup
    def indexes(self, view: View) -> ViewIndexes:
        """The alias, live index and owner index of ``view`` on this sink."""
        names = self._prepared.get(view.name)
        return names if names is not None else ViewIndexes.of(view, self.index_prefix)

    def prepare(self, views: Sequence[View]) -> None:
        """Store the script; create each view's live index behind its alias and its owner
        index (idempotent, safe when several daemons start together)."""
        mine = [v for v in views if v.kind == "opensearch"]
        claimed: dict[str, str] = {}
        for view in mine:
            names = ViewIndexes.of(view, self.index_prefix)
            other = claimed.setdefault(names.alias, view.name)
            if other != view.name:
                raise SinkError(
                    f"views {other!r} and {view.name!r} both use index {view.index!r} on "
                    f"OpenSearch connection {self.name!r}; give each view its own index"
                )
            held = self._prepared.get(view.name)
            if held is not None and held != names:
                raise SinkError(f"two different views are named {view.name!r}")
        self._call(self._put_script)
        self._put_owners_template()
        for view in mine:
            if view.name not in self._prepared:
                self._call(lambda v=view: self._prepare_view(v))  # type: ignore[misc]

    def _put_script(self) -> None:
        body = {"script": {"lang": "painless", "source": script_source()}}
        self.client.transport.perform_request(
            "PUT",
            f"/_scripts/{self.script_id}",
            body=dumps(body),
            headers=_JSON,
            timeout=self.request_timeout,
        )

    @property
    def owners_template(self) -> str:
        """The name of the index template of the owner indexes (see
        :meth:`_put_owners_template`)."""
        return f"{self.index_prefix}viewkeeper-owners"

    def _put_owners_template(self) -> None:
        """An index template giving any ``P*.vk-owners`` index viewkeeper's owner mappings.

        The owner phase (W1) cannot use ``require_alias``: a write to an owner index that
        was deleted (the cluster lost it, ``DELETE orders*``) creates it again. With dynamic
        mappings (``v``, ``item``, ``doc`` as text) it could never be given viewkeeper's
        again, and the view could not be re-armed until someone deleted it by hand. With this
        template it gets the right mappings — and no ``_meta``: it holds no claim, so the
        view is seen lost and re-armed (:meth:`read_claim`, :meth:`_prepare_view`). A node
        that refuses the template (no ``indices:admin/index_template/put`` permission, another
        template at its priority) is only warned about: :meth:`_prepare_view` then replaces
        an owner index it finds with other mappings. The priority grows with the prefix, so
        that the templates of two prefixes never share one (OpenSearch refuses overlapping
        patterns at one priority)."""
        body = {
            "index_patterns": [f"{self.index_prefix}*{OWNERS_SUFFIX}"],
            "priority": 2_000_000_000 + len(self.index_prefix),
            "template": {"settings": self.index_settings, "mappings": OWNERS_MAPPINGS},
            "_meta": {"viewkeeper": {"role": "owners-template", "format": OWNERS_FORMAT}},
        }

        def put() -> str | None:
            try:
                self.client.transport.perform_request(
                    "PUT",
                    f"/_index_template/{self.owners_template}",
                    body=dumps(body),
                    headers=_JSON,
                    timeout=self.request_timeout,
                )
            except (AuthorizationException, AuthenticationException) as exc:
                return _exc_text(exc)
            except TransportError as exc:
                if _is_transient(exc):
                    raise
                return _exc_text(exc)  # refused (e.g. another template at its priority)
            return None

        refused = self._call(put)
        if refused is not None:
            log.warning(
                "OpenSearch sink %s (%s): cannot store the index template %s (%s): an owner "
                "index deleted under viewkeeper would be made again with other mappings, and "
                "replaced when the view is re-armed",
                self.name,
                self.where,
                self.owners_template,
                _short(_scrub(refused), 300),
            )

    def _exists(self, path: str) -> bool:
        return bool(self.client.transport.perform_request("HEAD", path, params={"ignore": 404}))

    def _prepare_view(self, view: View) -> None:
        names = ViewIndexes.of(view, self.index_prefix)
        tp = self.client.transport
        found = tp.perform_request("GET", f"/_alias/{names.alias}", params={"ignore": 404})
        holders = {
            k
            for k, v in (found or {}).items()
            if isinstance(v, Mapping) and names.alias in (v.get("aliases") or {})
        }
        if not holders and self._exists(f"/{names.alias}"):
            raise SinkError(
                f"OpenSearch {self.where}: view {view.name!r} needs {names.alias!r} to be an "
                f"alias that viewkeeper manages, but a concrete index {names.alias!r} exists. "
                f"Fix: reindex it into {names.live!r} (or drop it) and delete it, then start "
                f"again; viewkeeper creates {names.live!r} behind the alias {names.alias!r} "
                f"(run `viewkeeper rebuild {view.name}` to fill it)"
            )
        if holders - {names.live}:
            raise SinkError(
                f"OpenSearch {self.where}: alias {names.alias!r} of view {view.name!r} points "
                f"to {sorted(holders)!r}, not to viewkeeper's index {names.live!r}. Fix: remove "
                f"the alias from those indexes (POST /_aliases remove) and start again"
            )
        meta = {"viewkeeper": {"view": view.name, "role": "live", "format": 1}}
        live_body = {
            "settings": self.index_settings,
            "mappings": {**LIVE_MAPPINGS, "_meta": meta},
            "aliases": {names.alias: {}},
        }
        if not self._create_index(names.live, live_body):
            found = tp.perform_request("GET", f"/{names.live}/_mapping")
            old = (found.get(names.live, {}).get("mappings", {}).get("_meta") or {}).get(
                "viewkeeper", {}
            )
            if old.get("view") not in (None, view.name):
                log.warning(
                    "index %s was made for view %r and is now used by view %r (renamed?)",
                    names.live,
                    old.get("view"),
                    view.name,
                )
            tp.perform_request(
                "PUT",
                f"/{names.live}/_mapping",
                headers=_JSON,
                body=dumps({"properties": LIVE_MAPPINGS["properties"]}),
            )
            if not holders:
                tp.perform_request(
                    "POST",
                    "/_aliases",
                    headers=_JSON,
                    body=dumps({"actions": [{"add": {"index": names.live, "alias": names.alias}}]}),
                )
        owners_meta = {"viewkeeper": {"view": view.name, "role": "owners", "format": OWNERS_FORMAT}}
        owners_body = {
            "settings": self.index_settings,
            "mappings": {**OWNERS_MAPPINGS, "_meta": owners_meta},
        }
        if not self._create_index(names.owners, owners_body):
            found = tp.perform_request("GET", f"/{names.owners}/_mapping")
            mappings = found.get(names.owners, {}).get("mappings", {})
            if (mappings.get("_meta") or {}).get("viewkeeper"):
                # made by viewkeeper, maybe an older one: map the fields added since
                tp.perform_request(
                    "PUT",
                    f"/{names.owners}/_mapping",
                    headers=_JSON,
                    body=dumps({"properties": OWNERS_MAPPINGS["properties"]}),
                )
            else:
                self._adopt_owners(view, names, owners_body)
        uuid = self._live_uuid(names.live)
        if uuid != self._uuids.get(view.name):
            self._forget_view(view.name, uuid)  # made again: what was written there is gone
        self._prepared[view.name] = names

    def _adopt_owners(self, view: View, names: ViewIndexes, body: Mapping[str, Any]) -> None:
        """An owner index viewkeeper did not make (no ``_meta``): a write made it after the
        one viewkeeper made was deleted (see :meth:`_put_owners_template`). It holds no
        claim, so the view is lost (:meth:`read_claim`) and is re-armed and rebuilt. It is
        given viewkeeper's mappings and ``_meta`` (no claim), or, when its mappings cannot
        take them (made without the template: dynamic text fields), deleted and made again:
        what it holds was written after the loss, by batches that were refused (the live
        phase found the alias missing) or that the rebuild writes again."""
        tp = self.client.transport
        try:
            tp.perform_request(
                "PUT",
                f"/{names.owners}/_mapping",
                headers=_JSON,
                body=dumps({**OWNERS_MAPPINGS, "_meta": body["mappings"]["_meta"]}),
            )
            log.warning(
                "view %s: owner index %s was made again by a write, not by viewkeeper (it "
                "was lost): given viewkeeper's mappings; the view is re-armed and rebuilt",
                view.name,
                names.owners,
            )
            return
        except TransportError as exc:
            if _is_transient(exc) or exc.status_code != 400:
                raise
            reason = _error_text(_reason_of(exc.info))
        log.warning(
            "view %s: owner index %s was made again by a write with other mappings (%s): "
            "deleting it and making it again; the view is re-armed and rebuilt",
            view.name,
            names.owners,
            _short(reason, 300),
        )
        tp.perform_request("DELETE", f"/{names.owners}", params={"ignore": 404})
        if not self._create_index(names.owners, body):
            raise SinkError(
                f"OpenSearch {self.where}: owner index {names.owners!r} of view {view.name!r} "
                "was made again while viewkeeper replaced it; start again"
            )

    def _create_index(self, index: str, body: Mapping[str, Any]) -> bool:
        """Create ``index``; False when it exists already (another daemon may have won)."""
        if self._exists(f"/{index}"):
            return False
        try:
            self.client.transport.perform_request(
                "PUT", f"/{index}", body=dumps(body), headers=_JSON, timeout=self.request_timeout
            )
        except TransportError as exc:
            if exc.error == "resource_already_exists_exception":
                return False
            raise
        log.info("created OpenSearch index %s", index)
        return True

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

    # ------------------------------------------------------------------------------------
    # apply
    def apply(self, changes: Sequence[Change]) -> list[Result]:
        """Apply a batch (README.md § One batch, step by step); one Result per change."""
        plans = [self._plan(ch) for ch in changes]
        early, late = self._early(plans)
        uuids: dict[str, str | None] = {}  # the live indexes' uuids, read once per apply
        if not early:
            self._owner_phase(plans)
            checks = self._live_phase(plans, uuids)
            if checks:
                self._post_check(checks)
        else:
            # Puts of default-id documents read and write no owner record before their
            # post-check: they leave first, and the owner phase (W1) of the others, their
            # live ops and the puts' post-check overlap with them on the server.
            first = self._live_send(early, background=True, uuids=uuids)
            second: _Live | None = None
            try:
                self._owner_phase(late)
                second = self._live_send(late, background=True, uuids=uuids)
                checks = self._live_collect(first)
                if checks:
                    self._post_check(checks)
                checks = self._live_collect(second)
                if checks:
                    self._post_check(checks)
            finally:
                # never leave a request of this apply running behind an exception
                wait([f for live in (first, second) if live is not None for _, _, f in live.sent])
        self._unpend_phase(plans)
        return [self._result(p) for p in plans]

    def _early(self, plans: list[_Plan]) -> tuple[list[_Plan], list[_Plan]]:
        """Split a batch for :meth:`apply`: ``early``, the puts of a default document id
        (the item key), which need no owner phase, and ``late``, all the rest; ``early`` is
        empty when there is nothing to overlap (one request at a time: ``bulk_concurrency``
        1, or nothing else in the batch). A put whose document a late change of the batch
        may touch stays late, so the ops of one document keep the batch's order."""
        if self.bulk_concurrency < 2:
            return [], plans
        early: list[_Plan] = []
        late: list[_Plan] = []
        for p in plans:
            (early if p.outcome is None and p.doc is not None and not p.tracked else late).append(p)
        if not early or not any(p.outcome is None for p in late):
            return [], plans
        touched = {(p.names.alias, p.key_id) for p in late}
        touched.update((p.names.alias, p.doc_key) for p in late if p.doc_key is not None)
        if any((p.names.alias, p.key_id) in touched for p in early):
            early = [p for p in early if (p.names.alias, p.key_id) not in touched]
            now = {id(p) for p in early}
            late = [p for p in plans if id(p) not in now]
        return early, late

    @staticmethod
    def _result(p: _Plan) -> Result:
        if p.outcome is None:  # every path sets one; never report APPLIED by default
            return Result(
                Outcome.ERROR,
                f"view {p.change.view.name!r}, item "
                f"{shown(p.change.item_key)}: the OpenSearch sink reached no outcome",
            )
        return Result(p.outcome, p.error, p.collisions or [])

    def _plan(self, change: Change) -> _Plan:
        view = change.view
        names = self._prepared.get(view.name)
        if names is None:
            self.prepare([view])
            names = self._prepared[view.name]
        entries = change.entries
        custom = view.doc_id is not None
        if not entries:
            return _Plan(change, names, None, custom, change.version.encode())
        doc = entries[0]
        if len(entries) != 1 or not isinstance(doc, Document):
            plan = _Plan(change, names, None, custom, change.version.encode())
            plan.fail(
                f"view {view.name!r}, item {shown(change.item_key)}: an opensearch_view owns at "
                f"most one Document per item, got {list(entries)!r}"
            )
            return plan
        plan = _Plan(
            change, names, doc, custom or doc.doc_id != change.item_key, change.version.encode()
        )
        if plan.tracked:  # an id of the view's: as it is, so at most 512 bytes
            size = len(doc.doc_id.encode("utf-8", "surrogatepass"))
            if size > MAX_ID_BYTES:
                made = "doc_id= returned" if custom else "the change gives"
                plan.fail(
                    f"view {view.name!r}, item {shown(change.item_key)}: {made} the document "
                    f"id {shown(doc.doc_id)}, {size} bytes: more than OpenSearch's "
                    f"{MAX_ID_BYTES}-byte _id. This is a bug of the view's doc_id= function: "
                    "return a shorter id (e.g. a hash of it)"
                )
        return plan

    def _action(self, index: str, doc_id: str) -> bytes:
        return self._head(b"update", index) + dumps(doc_id) + b"}}\n"

    def _owner_phase(self, plans: list[_Plan]) -> None:
        ops: list[_Op] = []
        now_ms = int(self.clock() * 1000)
        for p in plans:
            if p.outcome is not None or (p.doc is not None and not p.tracked):
                continue
            ch = p.change
            rec: dict[str, Any] = {"v": p.version, "g": ch.version.generation, "item": ch.item_key}
            if p.doc is not None:
                rec["doc"] = p.doc.doc_id
            else:
                rec["deleted_at"] = now_ms
            lines = self._action(p.names.owners, p.key_id) + self._own_pre + dumps(rec) + b"}}}\n"
            ops.append(_Op(p, "own", p.key_id, lines))
        for op, item in zip(ops, self._run(ops, require_alias=False), strict=True):
            p = op.plan
            if self._failed(op, item):
                continue
            src = (item.get("get") or {}).get("_source") or {}
            result = item.get("result")
            rec_v = src.get("v")
            if result == "noop" and rec_v != p.version:
                p.outcome = Outcome.STALE  # a newer change of this item is already recorded
            else:
                p.owner_moved = result != "noop"
                p.recorded = True
            if not isinstance(rec_v, str):
                continue
            # Whatever the outcome, the record's pending documents are deleted again (at
            # the record's version) and forgotten once that is acknowledged: a replay, a
            # stale change or a newer one finishes what a killed apply left undone.
            doc = src.get("doc")
            listed = [
                *_ids(src.get("pending")),
                *_ids(src.get("prev_docs")),
                *_ids(src.get("prev_doc")),
            ]
            pending = [x for x in dict.fromkeys(listed) if x != doc]
            gone = list(pending)
            if (
                p.outcome is Outcome.STALE
                and p.doc_key is not None
                and p.doc_key != doc
                and p.doc_key not in gone
            ):
                # a stale change's own document is not the item's: if a killed apply of
                # this change put it (and died before the post-check), this removes it
                gone.append(p.doc_key)
            if gone:
                p.rec_v, p.gone = rec_v, gone
                p.unpend = pending or None

    def _live_phase(
        self, plans: list[_Plan], uuids: dict[str, str | None] | None = None
    ) -> list[_Check]:
        """The live ops of ``plans``, sent and answered; returns the puts to post-check."""
        return self._live_collect(self._live_send(plans, uuids=uuids))

    def _live_send(
        self,
        plans: list[_Plan],
        background: bool = False,
        uuids: dict[str, str | None] | None = None,
    ) -> _Live:
        """Build the live ops and send them. A big batch is cut into ``bulk_concurrency``
        segments by document id (the ops of one change stay in one segment, in order, and
        the requests of a segment go one after the other: :meth:`_bulk` with one group;
        two changes' ops on one id may go side by side — a pending delete of one item and
        another item's put end the same in either order, as claims, see README.md § Documents
        passed between items); each segment is sent as soon as it is built, so building the
        next one overlaps with the server working on the previous one. ``background``: even
        one segment is sent from the pool, so that the caller can go on (:meth:`apply`).
        ``uuids``: the live indexes' uuids read in this apply (:meth:`_lookup`)."""
        ops: list[_Op] = []
        # stale changes come along only to delete their owner record's pending documents
        todo = [p for p in plans if p.outcome is None or (p.gone and p.outcome is Outcome.STALE)]
        known = self._lookup(
            [p for p in todo if p.doc_key and p.outcome is None], {} if uuids is None else uuids
        )
        try_create = self._new_share >= 0.5 and self.cas_cache_size > 0
        k = self.bulk_concurrency if len(todo) >= self.min_split else 1
        segments: list[list[_Plan]] = [todo]
        if k > 1:
            segments = [[] for _ in range(k)]
            for p in todo:
                if p.doc_key is not None and p.outcome is None:
                    target = p.doc_key
                else:
                    target = p.gone[0] if p.gone else p.key_id
                segments[hash(target) % k].append(p)
        live = _Live(todo, ops, [], time.monotonic() + self.unavailable_after)
        for segment in segments:
            start = len(ops)
            self._build_live(segment, ops, known, try_create)
            if (k > 1 or background) and len(ops) > start:
                future = self._executor().submit(
                    self._bulk, ops[start:], True, live.deadline, False
                )
                live.sent.append((start, len(ops), future))
        return live

    def _live_collect(self, live: _Live) -> list[_Check]:
        """Wait for the live ops sent by :meth:`_live_send` (send them if they were not),
        retry what must be, and learn the outcomes; returns the puts to post-check."""
        ops, todo = live.ops, live.todo
        first: list[dict[str, Any]] | None = None
        if live.sent:
            wait([f for _, _, f in live.sent])
            first = [{}] * len(ops)
            for start, end, future in live.sent:
                first[start:end] = future.result()
        checks: list[_Check] = []
        learnt: list[tuple[_Plan, str, Mapping[str, Any] | None]] = []
        misses = created = 0
        paths = {"script": 0, "cas": 0, "create": 0}
        for op, item in zip(ops, self._run(ops, require_alias=True, first=first), strict=True):
            p = op.plan
            result = item.get("result")
            if op.kind == "put":
                paths[op.path] += 1
                if not op.cached:
                    misses += 1
                    created += result == "created"
            if item.get("status", 0) >= 400 and self._failed(op, item):
                learnt.append((p, op.doc_id, None))
                continue
            if op.kind == "put":
                p.outcome = Outcome.STALE if result == "noop" else Outcome.APPLIED
                other = _other_claim(p.change.item_key, item)
                if result != "updated" or other is not None:
                    # an update that took the document from another item, or whose claim
                    # waits behind another item's, is checked like a create: no delete of
                    # this item is bound to come after it
                    checks.append((p, op.doc_id, other))
                learnt.append((p, op.doc_id, item))
                continue
            learnt.append((p, op.doc_id, None))
            # del | gone: acknowledged (deleted, noop, or 404: nothing to delete)
            if p.acked is None:
                p.acked = []
            p.acked.append(op.doc_id)
            if op.kind == "del":
                if result in ("deleted", "updated"):  # updated: its claim left a shared document
                    p.deleted = True
                elif item.get("status") != 404:
                    p.kept = True  # newer, or another item's: not this change's to delete
        for p in todo:
            if p.outcome is None and p.doc is None:  # a delete, its document(s) dealt with
                if p.deleted:
                    p.outcome = Outcome.APPLIED
                elif p.kept:
                    p.outcome = Outcome.STALE
                else:
                    p.outcome = Outcome.APPLIED if p.owner_moved else Outcome.STALE
        self._remember(learnt)
        with self._lock:
            if misses:
                self._new_share = (self._new_share + created / misses) / 2
            for path, count in paths.items():
                self.stats[f"put_{path}"] += count
        return checks

    def _build_live(
        self,
        todo: list[_Plan],
        ops: list[_Op],
        known: dict[tuple[str, str], _Known],
        try_create: bool,
    ) -> None:
        for p in todo:
            ch = p.change
            if p.outcome is not None:  # stale: only the owner record's pending deletes
                for x in p.gone or ():
                    ops.append(self._del_op(p, "gone", x, p.rec_v or p.version))
                continue
            if p.doc is not None and p.doc_key is not None:  # (the one is set with the other)
                doc_id = p.doc_key
                body = p.doc.body
                if META in body:  # never two _vk keys in one JSON object
                    body = {k: val for k, val in body.items() if k != META}
                jid = _jstr(doc_id)
                try:
                    payload = dumps(body)
                except EncodeError as exc:
                    known.pop((p.names.alias, doc_id), None)
                    p.fail(
                        f"view {ch.view.name!r}: document {shown(doc_id)} of item "
                        f"{shown(ch.item_key)} cannot be encoded: {exc}"
                    )
                    continue
                # the body with _vk appended, spliced as bytes (no dict copy per document)
                meta = b'"_vk":{"v":"%b","g":%d,"item":%b}}' % (
                    p.version.encode(),
                    ch.version.generation,
                    jid if doc_id == ch.item_key else _jstr(ch.item_key),
                )
                payload = payload[:-1] + b"," + meta if len(payload) > 2 else b"{" + meta
                ops.append(
                    self._put_op(
                        p, doc_id, jid, payload, known.get((p.names.alias, doc_id)), try_create
                    )
                )
                # the documents it moves away from are deleted once the put is answered (in
                # _unpend_phase): a put OpenSearch refuses leaves the item its last good one
                p.later = [x for x in p.gone or () if x != doc_id] or None
            elif p.tracked:  # custom doc_id: only the owner record knows the document(s)
                if not p.gone:
                    p.outcome = Outcome.APPLIED if p.owner_moved else Outcome.STALE
                    continue
                for x in p.gone:
                    ops.append(self._del_op(p, "del", x, p.version))
            else:
                ops.append(self._del_op(p, "del", p.key_id, p.version))
                for x in p.gone or ():
                    if x != p.key_id:
                        ops.append(self._del_op(p, "gone", x, p.version))

    def _head(self, kind: bytes, index: str) -> bytes:
        """``{"KIND":{"_index":INDEX,...,"_id":`` — the start of an action line, cached."""
        head = self._heads.get((kind, index))
        if head is None:
            tail = self._action_tail if kind == b"update" else b',"_id":'
            head = b'{"' + kind + b'":{"_index":' + dumps(index) + tail
            self._heads[(kind, index)] = head
        return head

    def _scripted_put(self, p: _Plan, jid: bytes, payload: bytes) -> bytes:
        head = self._head(b"update", p.names.alias)
        return b"%b%b}}\n%b%b}}}\n" % (head, jid, self._put_pre, payload)

    def _put_op(
        self,
        p: _Plan,
        doc_id: str,
        jid: bytes,
        payload: bytes,
        known: _Known | None,
        try_create: bool,
    ) -> _Op:
        """The put of one document (``jid``: its id as JSON): the scripted upsert, or a fast
        path (a plain ``create``, or an ``index`` conditional on this sink's last write, see
        :meth:`_remember`) that is resent as the script if it answers 409."""
        if known is None:
            if not try_create:
                return _Op(p, "put", doc_id, self._scripted_put(p, jid, payload))
            lines = b"%b%b}}\n%b\n" % (self._head(b"create", p.names.alias), jid, payload)
            return _Op(p, "put", doc_id, lines, payload, "create")
        seq_no, term, key, item = known
        v = p.change.version
        if item != p.change.item_key or (v.generation, len(v.sequence), v.sequence) <= key:
            return _Op(p, "put", doc_id, self._scripted_put(p, jid, payload))
        lines = b'%b%b,"if_seq_no":%d,"if_primary_term":%d}}\n%b\n' % (
            self._head(b"index", p.names.alias),
            jid,
            seq_no,
            term,
            payload,
        )
        return _Op(p, "put", doc_id, lines, payload, "cas", cached=True)

    def _lookup(
        self, puts: list[_Plan], uuids: dict[str, str | None]
    ) -> dict[tuple[str, str], _Known]:
        """What this sink last wrote to the documents of ``puts``, keyed (alias, document id)
        — only what it wrote to the live index that is there now. Entries are kept per
        physical index (its uuid): an index deleted and made again restarts ``_seq_no`` and
        ``_primary_term`` at (0, 1), so an entry of the old one would let a stale put through
        the ``if_seq_no`` fast path over a newer document of the new one. So when an entry is
        found, the live index's uuid is read (once per apply and view, into ``uuids``); a
        uuid that changed drops the view's entries. Each put also notes the uuid it was
        built under (``_Plan.uuid``), which is what :meth:`_remember` keys its answer by."""
        for p in puts:
            p.uuid = self._uuids.get(p.change.view.name)
        if self.cas_cache_size <= 0 or not puts:
            return {}
        cache = self._cache
        with self._lock:
            hits = [
                (p, hit)
                for p in puts
                if p.uuid is not None and (hit := cache.get((p.uuid, str(p.doc_key)))) is not None
            ]
        if not hits:
            return {}
        for p, _ in hits:
            name = p.change.view.name
            if name not in uuids:
                uuids[name] = self._live_uuid(p.names.live)
                if uuids[name] != self._uuids.get(name):
                    self._forget_view(name, uuids[name])
        known: dict[tuple[str, str], _Known] = {}
        for p, hit in hits:
            if uuids[p.change.view.name] == p.uuid:
                known[(p.names.alias, str(p.doc_key))] = hit
            else:
                p.uuid = uuids[p.change.view.name]
        return known

    def _live_uuid(self, live: str) -> str | None:
        """The uuid of index ``live`` now; None when it is missing."""

        def get() -> Any:
            return self.client.transport.perform_request(
                "GET",
                f"/{live}/_settings/index.uuid",
                params={"ignore": 404},
                timeout=self.request_timeout,
            )

        found = self._call(get) or {}
        uuid = ((found.get(live) or {}).get("settings") or {}).get("index", {}).get("uuid")
        return uuid if isinstance(uuid, str) else None

    def _forget_view(self, name: str, uuid: str | None = None) -> None:
        """Forget what this sink wrote to ``name``'s live index (fast-path entries), and
        take ``uuid`` as its uuid from now on (None: unknown until prepared again)."""
        with self._lock:
            old = self._uuids.pop(name, None)
            if uuid is not None:
                self._uuids[name] = uuid
            if old is not None:
                for key in [k for k in self._cache if k[0] == old]:
                    del self._cache[key]

    def _remember(self, learnt: list[tuple[_Plan, str, Mapping[str, Any] | None]]) -> None:
        """Keep what this sink just wrote to each document: ``_seq_no``/``_primary_term``,
        version and item (forget it after anything else). The next newer put of the
        document by the same item is then a plain ``index`` with ``if_seq_no`` and
        ``if_primary_term`` — about half the server cost of a scripted update, which must
        read the stored document — and it succeeds only if nobody wrote the document since,
        which is exactly when the script would have replaced it. Anything else answers 409
        and the put is resent as the script, so correctness never depends on this cache
        (other daemons, deletes, sweeps, failovers only cost a fallback)."""
        if self.cas_cache_size <= 0 or not learnt:
            return
        cache = self._cache
        with self._lock:
            for p, doc_id, item in learnt:
                if p.uuid is None:  # the index was not known when the put was built
                    continue
                key = (p.uuid, doc_id)
                if (
                    item is not None
                    and item.get("result") in ("created", "updated")
                    and not _meta(item).get("parked")  # a blind write would drop the claims
                    and _other_claim(p.change.item_key, item) is None
                ):
                    seq_no, term = item.get("_seq_no"), item.get("_primary_term")
                    if isinstance(seq_no, int) and isinstance(term, int):
                        v = p.change.version
                        cache[key] = (
                            seq_no,
                            term,
                            (v.generation, len(v.sequence), v.sequence),
                            p.change.item_key,
                        )
                        cache.move_to_end(key)
                        continue
                cache.pop(key, None)
            while len(cache) > self.cas_cache_size:
                cache.popitem(last=False)

    def _forget(self, p: _Plan, doc_id: str) -> None:
        uuid = self._uuids.get(p.change.view.name)
        if self.cas_cache_size > 0 and uuid is not None:
            with self._lock:
                self._cache.pop((uuid, doc_id), None)

    def _del_op(self, p: _Plan, kind: str, doc_id: str, version: str) -> _Op:
        lines = (
            self._action(p.names.alias, doc_id)
            + self._del_pre
            + dumps(version)
            + b',"item":'
            + dumps(p.change.item_key)
            + b"}}}\n"
        )
        return _Op(p, kind, doc_id, lines)

    def _post_check(self, checks: list[_Check]) -> None:
        """U2: one realtime ``mget`` of the owner records of the puts to check (and of the
        items whose claims they met); where a record is newer than the put and names
        another (or no) document, the fix deletes the put's claim at the record's version
        and the change is STALE. A put that took the document from another item, or waits
        behind its claim, reports a collision only while both items' records name the
        document (an item that moved away still has its delete to come: no collision)."""
        by_index: dict[str, list[_Check]] = {}
        for check in checks:
            if check[0].outcome is not Outcome.ERROR:  # an op of it failed: it stops there
                by_index.setdefault(check[0].names.owners, []).append(check)
        fixes: list[_Op] = []
        for owners, group in by_index.items():
            ids = [p.key_id for p, _, _ in group]
            ids += [item_id(other) for _, _, other in group if other is not None]
            ids = list(dict.fromkeys(ids))
            docs = self._call(lambda o=owners, i=ids: self._mget(o, i))  # type: ignore[misc]
            records: dict[str, Mapping[str, Any] | None] = {}
            for key, found in zip(ids, docs, strict=True):
                if "error" in found:
                    raise SinkUnavailable(
                        f"OpenSearch sink {self.name!r} ({self.where}): cannot read owner "
                        f"records in {owners!r}: {_error_text(found['error'])}"
                    )
                records[key] = found.get("_source") if found.get("found") else None
            for p, doc_id, other in group:
                src = records[p.key_id]
                if src and src.get("doc") != doc_id:
                    owner_v = src.get("v")
                    if isinstance(owner_v, str) and Version.decode(owner_v) > p.change.version:
                        fixes.append(self._del_op(p, "fix", doc_id, owner_v))
                        continue  # not this item's document any more: no collision of its
                elif src is None and p.tracked:
                    # W1 wrote this put's record, and it is gone: only a rebuild's sweep (to
                    # a newer generation: the item was not found), a wipe or a lost owner
                    # index removes a record that names a document. Deleted as the sweep
                    # would have: this item's claim below the next generation's start.
                    g = Version(p.change.version.generation + 1, "0").encode()
                    fixes.append(self._del_op(p, "fix", doc_id, g))
                    continue
                if other is not None and _claims(records[item_id(other)], other, doc_id):
                    entry = f"{p.change.view.index}/{doc_id}"
                    if p.collisions is None:
                        p.collisions = []
                    p.collisions.append(Collision(entry, other))
                    log.debug("collision on %s: items %r and %r", entry, p.change.item_key, other)
        for op, item in zip(fixes, self._run(fixes, require_alias=True), strict=True):
            self._forget(op.plan, op.doc_id)
            if self._failed(op, item):
                continue
            result = item.get("result")
            # deleted, or updated: the claim left a document other items claim too
            if result in ("deleted", "updated") or item.get("status") == 404:
                op.plan.outcome = Outcome.STALE
                with self._lock:
                    self.stats["post_check_fix"] += result in ("deleted", "updated")

    def _unpend_phase(self, plans: list[_Plan]) -> None:
        """The end of an apply. W2': the pending deletes of each put that was answered
        (applied, or a noop: the document holds the item's claim) — never of a put
        OpenSearch refused: that item keeps its document, and ``keep`` (below) undoes the
        move W1 made. Then W3: owner records forget the pending documents whose deletes were
        acknowledged in this apply — only the record of the version the deletes were made at
        (a newer record may own one again, or delete it at its own version)."""
        # puts refused (or never sent) after W1 moved the record to them; not a change that
        # fails below, in W2': its put is in, the record is right
        refused = {
            id(p)
            for p in plans
            if p.outcome is Outcome.ERROR and p.recorded and p.tracked and p.doc_key is not None
        }
        later = [
            self._del_op(p, "gone", x, p.version)
            for p in plans
            if p.later and p.outcome is not Outcome.ERROR
            for x in p.later
        ]
        if later:
            for op, item in zip(later, self._run(later, require_alias=True), strict=True):
                if not self._failed(op, item):
                    if op.plan.acked is None:
                        op.plan.acked = []
                    op.plan.acked.append(op.doc_id)
        ops: list[_Op] = []
        now_ms = int(self.clock() * 1000)
        for p in plans:
            if p.outcome is Outcome.ERROR:
                if id(p) in refused:
                    lines = (
                        self._action(p.names.owners, p.key_id)
                        + self._keep_pre
                        + dumps(p.version)
                        + b',"doc":'
                        + dumps(p.doc_key)
                        + b',"now":%d}}}\n' % now_ms
                    )
                    ops.append(_Op(p, "keep", p.key_id, lines))
                continue
            if not p.unpend or not p.acked or p.rec_v is None:
                continue
            done = [x for x in p.unpend if x in p.acked]
            if not done:
                continue
            key = p.key_id
            lines = (
                self._action(p.names.owners, key)
                + self._unpend_pre
                + dumps(p.rec_v)
                + b',"done":'
                + dumps(done)
                + b"}}}\n"
            )
            ops.append(_Op(p, "unpend", key, lines))
        if not ops:
            return
        for op, item in zip(ops, self._run(ops, require_alias=False), strict=True):
            if op.kind == "unpend":
                self._failed(op, item)
            elif item.get("status", 0) >= 400 and item.get("status") != 404:
                # the change stays ERROR with its own reason; its record keeps the move
                # (safe, see README.md § A put OpenSearch refuses) until the change is
                # applied again
                log.warning(
                    "view %s, item %s: could not undo the owner record's move to %s after its "
                    "put was refused: HTTP %s %s",
                    op.plan.change.view.name,
                    shown(op.plan.change.item_key),
                    shown(str(op.plan.doc_key)),
                    item.get("status"),
                    _short(_error_text(item.get("error"))),
                )

    def _mget(self, index: str, ids: list[str]) -> list[dict[str, Any]]:
        resp = self._post(
            f"/{index}/_mget", {"_source_includes": "v,doc"}, dumps({"ids": ids}), _JSON
        )
        docs: list[dict[str, Any]] = resp["docs"]
        if len(docs) != len(ids):
            raise SinkError(f"mget on {index!r} answered {len(docs)} docs for {len(ids)} ids")
        return docs

    def _failed(self, op: _Op, item: Mapping[str, Any]) -> bool:
        """Record a rejected item as this change's ERROR; True if the op failed."""
        status = item.get("status", 0)
        if status < 400 or (
            status == 404
            and op.kind in ("del", "gone", "fix", "unpend")
            and (item.get("error") or {}).get("type") == "document_missing_exception"
        ):
            return False
        ch = op.plan.change
        owner = op.kind in ("own", "unpend")
        where = op.plan.names.owners if owner else op.plan.names.alias
        what = "owner record" if owner else "document"
        op.plan.fail(
            f"view {ch.view.name!r}: OpenSearch rejected the {op.kind} of {what} "
            f"{shown(op.doc_id)} (item {shown(ch.item_key)}, index {where!r}): HTTP {status} "
            f"{_short(_error_text(item.get('error')))}"
        )
        return True

    # ------------------------------------------------------------------------------------
    # bulk with retries
    def _run(
        self, ops: list[_Op], *, require_alias: bool, first: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Send ``ops`` as ``_bulk`` requests (``first``: the answers of a first round sent
        already); retry items answering 409/429/5xx with backoff until
        ``unavailable_after``; return one response item per op."""
        results: list[dict[str, Any]] = [{}] * len(ops)
        pending = list(range(len(ops)))
        deadline = time.monotonic() + self.unavailable_after
        attempt = 0
        raced: dict[int, int] = {}  # op -> resends for a concurrent mapping update
        while pending:
            if first is not None:
                items, first = first, None
            else:
                items = self._bulk([ops[i] for i in pending], require_alias, deadline)
            retry: list[int] = []
            fallback: list[int] = []
            last: Mapping[str, Any] = {}
            script_missing = False
            for i, item in zip(pending, items, strict=True):
                status = item.get("status", 0)
                error = item.get("error")
                if status == 404 and require_alias and _index_missing(error):
                    names = ops[i].plan.names
                    name = ops[i].plan.change.view.name
                    self._prepared.pop(name, None)
                    self._forget_view(name)
                    if name in self._markers:  # its data is gone: viewkeeper.runtime.namespaces
                        raise NamespaceLost(
                            f"OpenSearch sink {self.name!r} ({self.where}): alias "
                            f"{names.alias!r} of view {name} is missing (index "
                            f"{names.live!r} deleted?)",
                            [name],
                        )
                    raise SinkUnavailable(
                        f"OpenSearch sink {self.name!r} ({self.where}): alias {names.alias!r} "
                        f"is missing (was index {names.live!r} deleted?); it is recreated on "
                        f"retry and needs `viewkeeper rebuild {ops[i].plan.change.view.name}`"
                    )
                op = ops[i]
                if status == 409 and op.payload is not None:
                    # a fast path lost (the document is not what this sink last wrote):
                    # resend as the scripted upsert at once
                    op.lines = self._scripted_put(op.plan, _jstr(op.doc_id), op.payload)
                    op.payload, op.path = None, "script"
                    fallback.append(i)
                    with self._lock:
                        self.stats["fallback"] += 1
                elif status == 400 and "unable to find script" in _error_text(error):
                    script_missing = True
                    retry.append(i)
                elif status in _RETRY_STATUS:
                    retry.append(i)
                    last = item
                elif _mapping_race(status, error) and raced.get(i, 0) < _MAPPING_RACE_RESENDS:
                    raced[i] = raced.get(i, 0) + 1  # the field is mapped by now: send again
                    retry.append(i)
                    last = item
                else:
                    results[i] = item
            if not retry:
                pending = fallback
                continue
            if script_missing:
                log.warning("stored script %s is missing; storing it again", self.script_id)
                self._call(self._put_script)
                pending = sorted(retry + fallback)
                continue
            if time.monotonic() >= deadline:
                raise SinkUnavailable(
                    f"OpenSearch sink {self.name!r} ({self.where}): {len(retry)} bulk items "
                    f"still failing after {self.unavailable_after:.1f}s, last: HTTP "
                    f"{last.get('status')} {_error_text(last.get('error'))}"
                )
            time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))
            attempt += 1
            pending = sorted(retry + fallback)
        return results

    def _bulk(
        self, ops: Sequence[_Op], require_alias: bool, deadline: float, split: bool = True
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

    def _chunks(self, ops: Sequence[_Op], group: list[int]) -> Iterable[tuple[list[int], bytes]]:
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

    # ------------------------------------------------------------------------------------
    # maintenance
    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        """Rebuild: delete live documents of generations older than ``generation`` (the
        scan did not write them: their items are gone) and documents viewkeeper did not
        write at all (no ``_vk``: drift), except documents of the items in ``keep`` (the
        scan could not project or write them: they keep their last good document).
        Documents the stream updates meanwhile carry the new generation, or conflict and are
        skipped (``conflicts=proceed``). Custom-id views also drop the owner records of such
        documents. Returns the number deleted."""
        del now
        names = self.indexes(view)
        old = {"range": {f"{META}.g": {"lt": generation}}}
        foreign = {"bool": {"must_not": {"exists": {"field": f"{META}.g"}}}}
        spared = [{"terms": {f"{META}.item": sorted(keep)}}] if keep else []
        query = {
            "query": {
                "bool": {"should": [old, foreign], "minimum_should_match": 1, "must_not": spared}
            }
        }
        deleted = self._delete_by_query(names.live, query)
        if view.doc_id is not None:
            owned = {"exists": {"field": "doc"}}
            older = {"range": {"g": {"lt": generation}}}
            spared_records = [{"terms": {"item": sorted(keep)}}] if keep else []
            self._delete_by_query(
                names.owners,
                {"query": {"bool": {"filter": [older, owned], "must_not": spared_records}}},
            )
        log.info(
            "sweep of view %s below generation %d deleted %d documents",
            view.name,
            generation,
            deleted,
        )
        return deleted

    # ------------------------------------------------------------------------------------
    # claims (viewkeeper.runtime.namespaces): in both indexes' _meta, which live and die with them
    def read_claim(self, view: View) -> Claim | None:
        """The view's claim: the one both its indexes' ``_meta`` hold (see README.md § Claims
        and lost indexes), or None — either index missing, made again (an owner index made by
        a write, or by viewkeeper after a loss, holds none), or the two holding different
        claims after a few re-reads (a claim being written is written to the owner index,
        then to the live one)."""
        names = ViewIndexes.of(view, self.index_prefix)

        def get() -> Any:
            return self.client.transport.perform_request(
                "GET",
                f"/{names.live},{names.owners}/_mapping",
                params={"ignore": 404, "ignore_unavailable": "true"},
                timeout=self.request_timeout,
            )

        for attempt in range(_CLAIM_READS):
            if attempt:
                time.sleep(_CLAIM_REREAD)
            found = self._call(get) or {}
            live = _vk_meta(found, names.live)
            owners = _vk_meta(found, names.owners)
            held = _claim_of(live)
            if held is None or owners is None:
                return None
            theirs = _claim_of(owners)
            if theirs is None:
                if owners.get("format") == 1:  # made before owner indexes held the claim
                    return held
                return None
            if (theirs.owner, theirs.marker) == (held.owner, held.marker):
                # a rebuild's announce writes the owner index first: the higher one is newer
                return Claim(held.owner, held.marker, max(held.generation, theirs.generation))
        return None

    def write_claim(self, view: View, claim: Claim) -> None:
        """Store ``claim`` in the ``_meta`` of both the view's indexes: the owner index
        first, then the live one (see :meth:`read_claim`). The view is prepared again
        first: an index lost and made again by a write is replaced or adopted there."""
        self._call(lambda: self._prepare_view(view))
        names = ViewIndexes.of(view, self.index_prefix)
        held = {
            "source": claim.owner.source,
            "coordination": claim.owner.coordination,
            "deployment": claim.owner.deployment,
            "marker": claim.marker,
            "generation": claim.generation,
        }
        for index, role, fmt in ((names.owners, "owners", OWNERS_FORMAT), (names.live, "live", 1)):
            meta = {"viewkeeper": {"view": view.name, "role": role, "format": fmt, "claim": held}}
            self._call(
                lambda index=index, meta=meta: self.client.transport.perform_request(  # type: ignore[misc]
                    "PUT",
                    f"/{index}/_mapping",
                    headers=_JSON,
                    body=dumps({"_meta": meta}),
                    timeout=self.request_timeout,
                )
            )

    def expect(self, view: View, marker: str | None) -> None:
        """OpenSearch cannot check a marker with each ``_bulk``: a write to a deleted index
        raises NamespaceLost (it would be recreated empty), and
        :meth:`viewkeeper.runtime.namespaces.Namespaces.verify` compares the claim every few
        seconds."""
        if self._markers.get(view.name) != marker:  # the data may have been started again
            self._forget_view(view.name, self._uuids.get(view.name))
        if marker is None:
            self._markers.pop(view.name, None)
        else:
            self._markers[view.name] = marker

    def wipe(self, view: View) -> int:
        """Delete every document and owner record of the view (a take-over)."""
        names = ViewIndexes.of(view, self.index_prefix)
        everything: dict[str, Any] = {"query": {"match_all": {}}}
        deleted = self._delete_by_query(names.live, everything)
        self._delete_by_query(names.owners, everything)
        self._forget_view(view.name, self._uuids.get(view.name))  # same index, no entries
        return deleted

    def purge_tombstones(self, view: View, older_than: float) -> int:
        """Delete tombstones written before ``older_than`` (epoch seconds); owner records of
        live documents have no ``deleted_at`` and are never purged."""
        names = self.indexes(view)
        old = {"range": {"deleted_at": {"lt": int(older_than * 1000)}}}
        pending = {"exists": {"field": "pending"}}
        query = {"query": {"bool": {"filter": [old], "must_not": [pending]}}}
        return self._delete_by_query(names.owners, query)

    def purge_expired(self, views: Sequence[View]) -> int:
        """Purge tombstones older than ``tombstone_retention`` in every view."""
        cutoff = self.clock() - self.tombstone_retention
        return sum(self.purge_tombstones(v, cutoff) for v in views if v.kind == "opensearch")

    def _delete_by_query(self, index: str, query: Mapping[str, Any]) -> int:
        def run() -> Any:
            tp = self.client.transport
            tp.perform_request("POST", f"/{index}/_refresh", timeout=self.request_timeout)
            return tp.perform_request(
                "POST",
                f"/{index}/_delete_by_query",
                params={"conflicts": "proceed", "refresh": "true"},
                body=dumps(query),
                headers=_JSON,
                timeout=self.maintenance_timeout,
            )

        resp = self._call(run)
        if resp.get("failures"):
            raise SinkError(f"delete_by_query on {index!r} failed: {resp['failures'][:3]!r}")
        return int(resp.get("deleted", 0))

    # ------------------------------------------------------------------------------------
    # read helpers (checkers, tests, the demo)
    def refresh(self, view: View) -> None:
        """Make everything written so far visible to search (tests and checkers only)."""
        names = self.indexes(view)
        self._call(
            lambda: self.client.transport.perform_request(
                "POST",
                f"/{names.alias},{names.owners}/_refresh",
                params={"ignore_unavailable": "true"},
                timeout=self.request_timeout,
            )
        )

    def live_documents(self, view: View, page: int = 1000) -> dict[str, dict[str, Any]]:
        """Every document readers see through the alias: {doc_id: body without _vk}."""
        self.refresh(view)
        return {
            hit["_id"]: hit["_source"]
            for hit in self._scan(self.indexes(view).alias, page, {"_source_excludes": META})
        }

    def tombstones(self, view: View) -> dict[str, str]:
        """{item key: encoded version} of the view's tombstones (owner records without doc)."""
        self.refresh(view)
        return {
            hit["_source"].get("item", hit["_id"]): hit["_source"]["v"]
            for hit in self._scan(
                self.indexes(view).owners,
                1000,
                {},
                {"bool": {"must_not": {"exists": {"field": "doc"}}}},
            )
        }

    def _scan(
        self,
        index: str,
        page: int,
        params: Mapping[str, str],
        query: Mapping[str, Any] | None = None,
    ) -> Iterable[dict[str, Any]]:
        tp = self.client.transport
        body: dict[str, Any] = {"size": page, "sort": ["_doc"]}
        if query is not None:
            body["query"] = query
        resp = tp.perform_request(
            "POST",
            f"/{index}/_search",
            params={**params, "scroll": "1m"},
            body=dumps(body),
            headers=_JSON,
            timeout=self.request_timeout,
        )
        scroll_id = resp.get("_scroll_id")
        try:
            while resp["hits"]["hits"]:
                yield from resp["hits"]["hits"]
                resp = tp.perform_request(
                    "POST",
                    "/_search/scroll",
                    headers=_JSON,
                    body=dumps({"scroll": "1m", "scroll_id": scroll_id}),
                )
                scroll_id = resp.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                with contextlib.suppress(TransportError):
                    tp.perform_request(
                        "DELETE",
                        "/_search/scroll",
                        headers=_JSON,
                        body=dumps({"scroll_id": [scroll_id]}),
                    )


def _vk_meta(mappings: Mapping[str, Any], index: str) -> dict[str, Any] | None:
    """``_meta.viewkeeper`` of ``index`` in a ``_mapping`` answer: None when the index is not
    in it (missing), ``{}`` when it has none (not made by viewkeeper)."""
    if index not in mappings:
        return None
    meta = ((mappings[index] or {}).get("mappings") or {}).get("_meta") or {}
    found = meta.get("viewkeeper")
    return dict(found) if isinstance(found, Mapping) else {}


def _claim_of(meta: Mapping[str, Any] | None) -> Claim | None:
    claim = (meta or {}).get("claim")
    if not isinstance(claim, Mapping) or not claim.get("marker"):
        return None
    owner = Owner(
        str(claim.get("source", "?")),
        str(claim.get("coordination", "?")),
        str(claim.get("deployment", "?")),
    )
    return Claim(owner, str(claim["marker"]), int(claim.get("generation", 0) or 0))


def _jstr(text: str) -> bytes:
    """A string as JSON (document ids, item keys): orjson directly, the general encoder for
    what orjson refuses (lone surrogates), so the error names the value."""
    try:
        return orjson.dumps(text)
    except orjson.JSONEncodeError:
        return dumps(text)


def _meta(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``_vk`` a scripted put read back (``get._source._vk``); empty if none."""
    meta = ((item.get("get") or {}).get("_source") or {}).get(META)
    return meta if isinstance(meta, Mapping) else {}


def _other_claim(item_key: str, item: Mapping[str, Any]) -> str | None:
    """The other item a put met on its document: the one it took the document from
    (``prev``), or the holder its claim waits behind (it is in ``parked``); None when
    the document is this item's alone."""
    meta = _meta(item)
    prev = meta.get("prev")
    if isinstance(prev, str) and prev != item_key:
        return prev
    holder = meta.get("item")
    parked = meta.get("parked")
    waits = isinstance(parked, list) and any(
        isinstance(c, Mapping) and c.get("item") == item_key for c in parked
    )
    return holder if waits and isinstance(holder, str) and holder != item_key else None


def _claims(record: Mapping[str, Any] | None, item_key: str, doc_id: str) -> bool:
    """Whether an item still claims ``doc_id`` by its owner record: the record names it,
    or (no record: an item of a view with the default id) it is the item's own id."""
    if record is None:
        return item_id(item_key) == doc_id
    return record.get("doc") == doc_id


def _ids(value: object) -> list[str]:
    """Document ids from an owner record field: a list of them, one, or nothing."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [x for x in value if isinstance(x, str) and x]
    return []


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
