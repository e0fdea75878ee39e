"""Change-log views on OpenSearch (``@changelog_view(opensearch=..., index=...)``): one
document per change record, in a physical index per UTC day behind the view's alias.

This mixin owns everything of a change-log view: :meth:`append` (one ``_bulk`` of
``create`` actions), the view's index template (:meth:`prepare`), its claim
(:meth:`read_claim`, :meth:`write_claim`, :meth:`expect`), and the work on its daily indices
(:meth:`wipe`, :meth:`purge_tombstones` by ``retention_days``). Every other view goes on to
the other mixins; :meth:`apply` refuses a change-log view and :meth:`sweep` refuses one
(there is no rebuild of a history).

Why a record is appended exactly once, however often it is sent (replays of a page, kill -9
between the append and the checkpoint, two processes during a lease handover, a dead letter
replayed): the document's ``_id`` and its index are derived from the record alone — the
``_id`` is the record's SequenceNumber (unique in the table's stream) and the index is the
UTC day of its ApproximateCreationDateTime — and the action is ``create``, which OpenSearch
runs atomically per ``_id`` on the shard's primary: the first one creates the document
(APPLIED), any later one answers 409 ``version_conflict_engine_exception`` (STALE). No
bookkeeping is needed, so nothing can get out of step with the documents. Limits: a record
without a creation time (``created_at`` 0.0; DynamoDB always sends one) is put on the day
of the sink's clock, so a replay on another day makes a second document; a day deleted by
the retention is never written again by a re-read, because ``retention_days`` is at least 2
and the stream keeps records 24 hours, but a change-log dead letter (they do not expire)
replayed after its day was deleted makes that day again, holding that one document, until
the next purge deletes it; a record whose first ``create`` was taken but whose
answer was lost (a connection cut, the ``_bulk`` sent again) is reported STALE, not APPLIED.

See README.md § Change-log views.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.projection.project import shown
from viewkeeper.sinks.base import (
    APPLIED,
    STALE,
    Append,
    Change,
    Claim,
    NamespaceLost,
    Outcome,
    Result,
    SinkError,
    SinkUnavailable,
)
from viewkeeper.sinks.encoding import EncodeError, dumps
from viewkeeper.sinks.opensearch.apply import _Apply
from viewkeeper.sinks.opensearch.changelog_indexes import (
    DAY,
    _ChangelogIndexes,
    _is_changelog,
    _parts,
    _vk,
)
from viewkeeper.sinks.opensearch.indexes import _claim_meta, _claim_of
from viewkeeper.sinks.opensearch.layout import META
from viewkeeper.sinks.opensearch.maintenance import _Maintenance
from viewkeeper.sinks.opensearch.plans import _jstr
from viewkeeper.sinks.opensearch.transport import (
    _JSON,
    _MAPPING_RACE_RESENDS,
    _RETRY_STATUS,
    _error_text,
    _index_missing,
    _mapping_race,
    _short,
)

SEQ_DIGITS = 40
"""A SequenceNumber has 21 to 40 digits; ``_vk.seq_sort`` holds it zero-padded to 40."""
_SEQ_RE = re.compile(rf"[0-9]{{1,{SEQ_DIGITS}}}\Z")


@dataclass(slots=True)
class _AppendOp:
    """One ``create`` of an append batch: the append's position, its index and lines."""

    at: int
    index: str
    doc_id: str
    lines: bytes


class _Changelog(_ChangelogIndexes, _Apply, _Maintenance):
    """Change-log views (a mixin of :class:`OpenSearchSink`, in front of the others: it
    routes each view to its own code or to theirs)."""

    _changelogs: dict[str, str]  # change-log view -> its alias, prepared by this sink

    # --- routing -----------------------------------------------------------------------
    def prepare(self, views: Sequence[View]) -> None:
        """Change-log views: their index template (below); every other view as before."""
        logs = [v for v in views if _is_changelog(v)]
        others = [v for v in views if not _is_changelog(v)]
        if logs:
            self._check_patterns(views)
        if others or not logs:
            super().prepare(others)
        for view in logs:
            if view.name not in self._changelogs:
                self._call(lambda v=view: self._prepare_changelog(v))  # type: ignore[misc]

    def apply(self, changes: Sequence[Change]) -> list[Result]:
        for ch in changes:
            if ch.view.changelog:
                raise SinkError(
                    f"view {ch.view.name!r} is a change-log view: it is written with "
                    "append(), never apply() (a bug of the caller)"
                )
        return super().apply(changes)

    def read_claim(self, view: View) -> Claim | None:
        """A change-log view's claim is the one in its template's ``_meta`` (None: no
        template, or one without a claim)."""
        if not _is_changelog(view):
            return super().read_claim(view)
        found = self._call(lambda: self._get_template(view))
        return None if found is None else _claim_of(_vk(found))

    def write_claim(self, view: View, claim: Claim) -> None:
        """Change-log view: the claim into the template's ``_meta`` (what :meth:`read_claim`
        and every append check), then into the ``_meta`` of the daily indices there are
        (readers' and operators' information; a new day gets it from the template)."""
        if not _is_changelog(view):
            super().write_claim(view, claim)
            return
        self._call(lambda: self._prepare_changelog(view))
        held = _claim_meta(claim)
        body = self._template_body(view, held)
        tp = self.client.transport
        self._call(
            lambda: tp.perform_request(
                "PUT",
                f"/_index_template/{self.changelog_template(view)}",
                body=dumps(body),
                headers=_JSON,
                timeout=self.request_timeout,
            )
        )
        days = [name for name, _, _ in self._days(view)]
        meta = {"_meta": body["template"]["mappings"]["_meta"]}
        for part in _parts(days):
            self._call(
                lambda part=part: tp.perform_request(  # type: ignore[misc]
                    "PUT",
                    f"/{','.join(part)}/_mapping",
                    params={"ignore_unavailable": "true", "allow_no_indices": "true"},
                    body=dumps(meta),
                    headers=_JSON,
                    timeout=self.request_timeout,
                )
            )

    def expect(self, view: View, marker: str | None) -> None:
        """Change-log view: every :meth:`append` reads the template's claim (one small
        ``GET``) before its ``_bulk`` and raises NamespaceLost, writing nothing, when the
        marker is not ``marker``: a template deleted (the index pattern would get
        OpenSearch's defaults: no alias, no ``_vk`` mapping) or its claim replaced (another
        process re-armed the view, another deployment took it over). Not caught: a change in
        the one round trip between that read and the ``_bulk``; daily indices deleted while
        the template stays (that history is gone; the next append makes the day again from
        the template, without a report); a daily index made by someone else with other
        mappings or without the alias (appends land there)."""
        if not _is_changelog(view):
            super().expect(view, marker)
        elif marker is None:
            self._markers.pop(view.name, None)
        else:
            self._markers[view.name] = marker

    def wipe(self, view: View) -> int:
        """Change-log view: delete its daily indices; the number of documents they held."""
        if not _is_changelog(view):
            return super().wipe(view)
        return self._delete_days(view, self._days(view))

    def purge_tombstones(self, view: View, older_than: float) -> int:
        """Change-log view (no tombstones; ``older_than`` is not used): delete the daily
        indices whose day ended more than ``retention_days`` before the sink's clock (none
        when it is None); the number of documents they held."""
        if not _is_changelog(view):
            return super().purge_tombstones(view, older_than)
        days = view.options.get("retention_days")
        if days is None:
            return 0
        cutoff = self.clock() - int(days) * DAY
        return self._delete_days(view, [d for d in self._days(view) if d[1] + DAY <= cutoff])

    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        if _is_changelog(view):
            raise SinkError(
                f"view {view.name!r} is a change-log view: there is nothing to sweep (a "
                "history cannot be rebuilt; `viewkeeper rebuild` refuses it)"
            )
        return super().sweep(view, generation, now, keep)

    # --- append ------------------------------------------------------------------------
    def append(self, appends: Sequence[Append]) -> list[Result]:
        """One ``create`` per append, all in one ``_bulk`` (module docstring); one Result
        per append, in order. Raises NamespaceLost (nothing written) when an expected claim
        is not there, SinkUnavailable when OpenSearch cannot take the batch."""
        if not appends:
            return []
        views: dict[str, View] = {}
        for a in appends:
            if not _is_changelog(a.view):
                raise SinkError(
                    f"view {a.view.name!r} is not an OpenSearch change-log view: append() "
                    "takes only those (a bug of the caller)"
                )
            views.setdefault(a.view.name, a.view)
        for view in views.values():
            if view.name not in self._changelogs:
                self.prepare([view])
        self._check_claims(list(views.values()))
        results: list[Result | None] = [None] * len(appends)
        ops: list[_AppendOp] = []
        for i, a in enumerate(appends):
            if a.failed:  # a dead-lettered record: ids from the record need no note
                results[i] = STALE
                continue
            try:
                ops.append(self._append_op(i, a))
            except (EncodeError, ValueError, OverflowError, OSError) as exc:
                results[i] = Result(
                    Outcome.ERROR,
                    f"view {a.view.name!r}: change {shown(a.sequence)} of item "
                    f"{shown(a.item_key)} cannot be written: {exc}",
                )
        if ops:
            self._send_appends(appends, ops, results)
        return [
            r if r is not None else Result(Outcome.ERROR, "the OpenSearch sink reached no outcome")
            for r in results
        ]

    def _append_op(self, i: int, a: Append) -> _AppendOp:
        seq = a.sequence
        if not isinstance(seq, str) or not _SEQ_RE.match(seq):
            raise ValueError(f"the sequence number {seq!r} is not 1 to {SEQ_DIGITS} digits")
        when = a.created_at if a.created_at > 0 else self.clock()
        index = self.changelog_index(a.view, when)
        body = a.body
        if not isinstance(body, dict) or META in body:
            body = {k: v for k, v in body.items() if k != META}  # never two _vk keys
        payload = dumps(body)
        meta = b'"_vk":{"seq":"%b","seq_sort":"%b","item":%b,"at":%d}}' % (
            seq.encode(),
            seq.zfill(SEQ_DIGITS).encode(),
            _jstr(a.item_key),
            int(when * 1000),
        )
        payload = payload[:-1] + b"," + meta if len(payload) > 2 else b"{" + meta
        head = b'{"create":{"_index":%b,"_id":"%b"}}\n' % (dumps(index), seq.encode())
        return _AppendOp(i, index, seq, head + payload + b"\n")

    def _send_appends(
        self, appends: Sequence[Append], ops: list[_AppendOp], results: list[Result | None]
    ) -> None:
        """Send the creates; retry those answering 429/5xx (and a concurrent mapping update,
        a few times) until ``unavailable_after``; 409 = the record's document is there."""
        deadline = time.monotonic() + self.unavailable_after
        pending = ops
        raced: dict[int, int] = {}
        attempt = 0
        while pending:
            items = self._bulk(pending, False, deadline)
            retry: list[_AppendOp] = []
            missing: set[str] = set()
            last: Mapping[str, Any] = {}
            for op, item in zip(pending, items, strict=True):
                status = item.get("status", 0)
                error = item.get("error")
                kind = error.get("type") if isinstance(error, Mapping) else None
                if 200 <= status < 300:
                    results[op.at] = APPLIED
                elif status == 409 and kind == "version_conflict_engine_exception":
                    results[op.at] = STALE  # created before: a replay, or twice in the batch
                elif status == 404 and _index_missing(error):
                    missing.add(op.index)  # the node does not create indexes on a write
                    retry.append(op)
                elif status in _RETRY_STATUS:
                    retry.append(op)
                    last = item
                elif _mapping_race(status, error) and raced.get(op.at, 0) < _MAPPING_RACE_RESENDS:
                    raced[op.at] = raced.get(op.at, 0) + 1  # the field is mapped by now
                    retry.append(op)
                    last = item
                else:
                    a = appends[op.at]
                    results[op.at] = Result(
                        Outcome.ERROR,
                        f"view {a.view.name!r}: OpenSearch rejected change {a.sequence} of "
                        f"item {shown(a.item_key)} (index {op.index!r}): HTTP {status} "
                        f"{_short(_error_text(error))}",
                    )
            for index in sorted(missing):
                self._call(lambda index=index: self._create_day(index), deadline)  # type: ignore[misc]
            if retry and not missing:
                if time.monotonic() >= deadline:
                    raise SinkUnavailable(
                        f"OpenSearch sink {self.name!r} ({self.where}): {len(retry)} change-log "
                        f"appends still failing after {self.unavailable_after:.1f}s, last: "
                        f"HTTP {last.get('status')} {_error_text(last.get('error'))}"
                    )
                time.sleep(min(1.0, 0.02 * 2**attempt))
                attempt += 1
            pending = retry

    def _check_claims(self, views: Sequence[View]) -> None:
        """Each view's expected marker against its template's claim (see :meth:`expect`);
        a template gone from a view without one is put again before anything is written."""
        found = self._call(self._get_templates)
        lost: list[str] = []
        for view in views:
            template = found.get(self.changelog_template(view))
            expected = self._markers.get(view.name)
            if expected is not None:
                held = None if template is None else _claim_of(_vk(template))
                if held is None or held.marker != expected:
                    lost.append(view.name)
            elif template is None:
                self._call(lambda v=view: self._prepare_changelog(v))  # type: ignore[misc]
        if lost:
            for name in lost:
                self._changelogs.pop(name, None)
            raise NamespaceLost(
                f"OpenSearch sink {self.name!r} ({self.where}): the claim of change-log "
                f"view(s) {', '.join(lost)} is gone or changed (index template deleted or "
                "claimed again); nothing was appended",
                lost,
            )
