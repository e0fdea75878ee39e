"""Work on a whole view: the rebuild's sweep, a wipe, the purge of old tombstones, and the
readers of checkers, tests and the demo (refresh, live documents, tombstones, a scroll).

See README.md § Concurrency (the sweep) and § Layout (tombstones).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from opensearchpy.exceptions import TransportError

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import SinkError
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.indexes import _Indexes
from viewkeeper.sinks.opensearch.layout import META, ViewIndexes
from viewkeeper.sinks.opensearch.transport import _JSON

log = logging.getLogger("viewkeeper.sinks.opensearch")


class _Maintenance(_Indexes):
    """Sweep, wipe, purge and the readers (a mixin of :class:`OpenSearchSink`)."""

    tombstone_retention: float
    maintenance_timeout: float
    clock: Callable[[], float]

    def begin_rebuild(self, view: View, floor: int) -> None:
        """Nothing to begin: an OpenSearch view owns no entry shared by many items."""
        del view, floor

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
