"""The live phase (U1/W2): each change's put or deletes through the alias, built as bytes,
cut into segments by document id and sent as soon as built (in the background for the
overlap), a put by a fast path when one applies; their answers become outcomes and the puts
to post-check.

See README.md § One batch, step by step (step 2), § Overlap and § Fast paths for puts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import wait
from typing import Any

from viewkeeper.projection.project import shown
from viewkeeper.sinks.base import Outcome
from viewkeeper.sinks.encoding import EncodeError, dumps
from viewkeeper.sinks.opensearch.layout import META
from viewkeeper.sinks.opensearch.ops import _Ops
from viewkeeper.sinks.opensearch.plans import _Check, _jstr, _Known, _Live, _Op, _other_claim, _Plan


class _LivePhase(_Ops):
    """The live phase of an apply (a mixin of :class:`OpenSearchSink`)."""

    _new_share: float

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
