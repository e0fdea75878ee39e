"""What this sink last wrote to each document (``_seq_no``, primary term, version, item),
kept per physical live index (its uuid), so that a put can go as a conditional blind write.

See README.md § Fast paths for puts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from viewkeeper.sinks.opensearch.plans import _Known, _meta, _other_claim, _Plan
from viewkeeper.sinks.opensearch.transport import _Transport


class _Cache(_Transport):
    """The fast paths' cache (a mixin of :class:`OpenSearchSink`)."""

    cas_cache_size: int
    _cache: OrderedDict[tuple[str, str], _Known]
    _uuids: dict[str, str]

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
