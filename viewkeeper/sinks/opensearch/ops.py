"""The ops of an apply: their ``_bulk`` action lines, sent with retries of each item (409,
429 and 5xx, a concurrent mapping update, a fast path that lost, the stored script gone, the
alias gone: NamespaceLost), and an op OpenSearch rejected made its change's ERROR.

See README.md § Outcomes and errors.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from viewkeeper.projection.project import shown
from viewkeeper.sinks.base import NamespaceLost, SinkUnavailable
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.indexes import _Indexes
from viewkeeper.sinks.opensearch.plans import _jstr, _Op, _Plan
from viewkeeper.sinks.opensearch.transport import (
    _MAPPING_RACE_RESENDS,
    _RETRY_STATUS,
    _error_text,
    _index_missing,
    _mapping_race,
    _short,
)

log = logging.getLogger("viewkeeper.sinks.opensearch")


class _Ops(_Indexes):
    """Building and sending the ops of an apply (a mixin of :class:`OpenSearchSink`)."""

    stats: dict[str, int]
    _heads: dict[tuple[bytes, str], bytes]
    _action_tail: bytes
    _put_pre: bytes
    _del_pre: bytes

    def _head(self, kind: bytes, index: str) -> bytes:
        """``{"KIND":{"_index":INDEX,...,"_id":`` — the start of an action line, cached."""
        head = self._heads.get((kind, index))
        if head is None:
            tail = self._action_tail if kind == b"update" else b',"_id":'
            head = b'{"' + kind + b'":{"_index":' + dumps(index) + tail
            self._heads[(kind, index)] = head
        return head

    def _action(self, index: str, doc_id: str) -> bytes:
        return self._head(b"update", index) + dumps(doc_id) + b"}}\n"

    def _scripted_put(self, p: _Plan, jid: bytes, payload: bytes) -> bytes:
        head = self._head(b"update", p.names.alias)
        return b"%b%b}}\n%b%b}}}\n" % (head, jid, self._put_pre, payload)

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
