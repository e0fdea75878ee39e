"""The OpenSearch sink, :class:`OpenSearchSink`: one ``opensearch:`` connection's settings
and state, composed of this package's mixins, one per responsibility.

See README.md (the design, and § Where the code is).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opensearchpy import OpenSearch

from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.apply import _Apply
from viewkeeper.sinks.opensearch.changelog import _Changelog
from viewkeeper.sinks.opensearch.layout import SCRIPT_NAME, ViewIndexes
from viewkeeper.sinks.opensearch.maintenance import _Maintenance
from viewkeeper.sinks.opensearch.plans import _Known
from viewkeeper.sinks.opensearch.transport import _host_text, make_client


class OpenSearchSink(_Changelog, _Apply, _Maintenance):
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
        self._changelogs: dict[str, str] = {}  # change-log view -> its alias (prepared)
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
