"""One batch (:meth:`OpenSearchSink.apply`): its plans, the owner phase (W1), the early puts
overlapping the rest, the post-check (U2) and its fix, and the finish (W2' and W3, ``keep``
after a refused put).

See README.md § One batch, step by step, § Why this gives I3, § Pending deletes, § A put
OpenSearch refuses, § Documents passed between items and § Collisions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import wait
from typing import Any

from viewkeeper.projection.entries import Document
from viewkeeper.projection.project import shown
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change, Collision, Outcome, Result, SinkUnavailable
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.layout import MAX_ID_BYTES, item_id
from viewkeeper.sinks.opensearch.live import _LivePhase
from viewkeeper.sinks.opensearch.plans import _Check, _Live, _Op, _Plan
from viewkeeper.sinks.opensearch.transport import _error_text, _short

log = logging.getLogger("viewkeeper.sinks.opensearch")


class _Apply(_LivePhase):
    """An apply and its phases (a mixin of :class:`OpenSearchSink`)."""

    clock: Callable[[], float]
    _own_pre: bytes
    _unpend_pre: bytes
    _keep_pre: bytes

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
