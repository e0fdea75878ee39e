"""The change-log views' indexes on OpenSearch: the names (alias ``P{index}``, daily indices
``P{index}-YYYY.MM.DD``, the index template), the template that gives every daily index the
alias, the ``_vk`` mapping and the ``_meta`` with the view's claim, and the listing and
deleting of daily indices (wipe, retention).

See README.md § Change-log views.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opensearchpy.exceptions import TransportError

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import SinkError
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.indexes import _Indexes
from viewkeeper.sinks.opensearch.layout import META, ViewIndexes
from viewkeeper.sinks.opensearch.transport import _JSON

DAY = 86_400
CHANGELOG_FORMAT = 1
TEMPLATE_PRIORITY = 1_900_000_000
"""Plus the alias's length: below the owner indexes' template (2e9 + len(prefix)), whose
pattern overlaps; two change-log patterns that overlap (``orders-*``, ``orders-eu-*``) differ
in length, and the longer, more specific one wins."""

CHANGELOG_MAPPINGS: dict[str, Any] = {
    "dynamic": True,
    "properties": {
        META: {
            "dynamic": False,
            "properties": {
                "seq": {"type": "keyword"},
                "seq_sort": {"type": "keyword"},
                "item": {"type": "keyword"},
                "at": {"type": "date", "format": "epoch_millis"},
            },
        }
    },
}
"""Users' fields dynamic, ``_vk`` explicit: ``seq`` (the SequenceNumber as sent: search it),
``seq_sort`` (the same, zero-padded to 40 digits: *sort on this one*, keyword order is then
the stream's order), ``item`` (the item key), ``at`` (the change's time, epoch ms)."""
_DELETE_AT_ONCE = 50  # index names per request (the request line has a limit)


class _ChangelogIndexes(_Indexes):
    """The change-log views' template and daily indices (a mixin of :class:`OpenSearchSink`)."""

    _changelogs: dict[str, str]  # change-log view -> its alias, prepared by this sink
    maintenance_timeout: float

    # --- names -----------------------------------------------------------------------
    def changelog_alias(self, view: View) -> str:
        """The alias readers search: ``P{index}``; its daily indices: ``P{index}-YYYY.MM.DD``."""
        return ViewIndexes.of(view, self.index_prefix).alias

    def changelog_template(self, view: View) -> str:
        """The name of the view's index template (never one of the sink's other templates)."""
        return f"{self.index_prefix}viewkeeper-changelog-{view.index}"

    def changelog_index(self, view: View, when: float) -> str:
        """The daily index of a change made at ``when`` (epoch seconds, UTC day)."""
        return f"{self.changelog_alias(view)}-{time.strftime('%Y.%m.%d', time.gmtime(when))}"

    def _create_day(self, index: str) -> None:
        """Create a daily index (its template gives it all): for a node that does not make
        indexes on a write (``action.auto_create_index``)."""
        try:
            self.client.transport.perform_request(
                "PUT", f"/{index}", body=b"{}", headers=_JSON, timeout=self.request_timeout
            )
        except TransportError as exc:
            if exc.error != "resource_already_exists_exception":
                raise

    # --- the template ------------------------------------------------------------------
    def _prepare_changelog(self, view: View) -> None:
        """The view's index template for ``P{index}-*``: the alias ``P{index}``, the ``_vk``
        mapping and ``_meta`` (with the claim, kept as it is); put when missing or made by
        another version (its ``shape`` differs). Refuses a concrete index named
        ``P{index}``, and an alias ``P{index}`` on indexes that are not the view's days."""
        alias = self.changelog_alias(view)
        tp = self.client.transport
        found = tp.perform_request("GET", f"/_alias/{alias}", params={"ignore": 404})
        holders = {
            k
            for k, v in (found or {}).items()
            if isinstance(v, Mapping) and alias in (v.get("aliases") or {})
        }
        if not holders and self._exists(f"/{alias}"):
            raise SinkError(
                f"OpenSearch {self.where}: change-log view {view.name!r} needs {alias!r} to be "
                f"the alias of its daily indices ({alias}-YYYY.MM.DD), but a concrete index "
                f"{alias!r} exists. Fix: reindex it elsewhere (or drop it) and delete it, or "
                "give the view another index=, then start again"
            )
        day = _day_re(alias)
        strangers = sorted(h for h in holders if not day.match(h))
        if strangers:
            raise SinkError(
                f"OpenSearch {self.where}: alias {alias!r} of change-log view {view.name!r} "
                f"points to {strangers!r}, not only to its daily indices ({alias}-YYYY.MM.DD)."
                " Fix: remove the alias from those indexes (POST /_aliases remove), or give "
                "the view another index=, then start again"
            )
        current = self._get_template(view)
        meta = _vk(current) if current is not None else {}
        claim = meta.get("claim")
        body = self._template_body(view, claim if isinstance(claim, Mapping) else None)
        if current is None or meta.get("shape") != body["_meta"]["viewkeeper"]["shape"]:
            try:
                tp.perform_request(
                    "PUT",
                    f"/_index_template/{self.changelog_template(view)}",
                    # a new one only if none is there: never over a claim written meanwhile
                    params=None if current is not None else {"create": "true"},
                    body=dumps(body),
                    headers=_JSON,
                    timeout=self.request_timeout,
                )
            except TransportError as exc:
                if current is not None or "already exists" not in str(exc.info):
                    raise
        self._changelogs[view.name] = alias

    def _template_body(self, view: View, claim: Mapping[str, Any] | None) -> dict[str, Any]:
        alias = self.changelog_alias(view)
        meta: dict[str, Any] = {"view": view.name, "role": "changelog", "format": CHANGELOG_FORMAT}
        shape = {
            "patterns": [f"{alias}-*"],
            "priority": TEMPLATE_PRIORITY + len(alias),
            "settings": self.index_settings,
            "mappings": CHANGELOG_MAPPINGS,
            "aliases": {alias: {}},
            "meta": meta,
        }
        if claim is not None:
            meta = {**meta, "claim": dict(claim)}
        return {
            "index_patterns": shape["patterns"],
            "priority": shape["priority"],
            "template": {
                "settings": self.index_settings,
                "mappings": {**CHANGELOG_MAPPINGS, "_meta": {"viewkeeper": meta}},
                "aliases": shape["aliases"],
            },
            "_meta": {
                "viewkeeper": {**meta, "shape": hashlib.sha256(dumps(shape)).hexdigest()[:16]}
            },
        }

    def _get_template(self, view: View) -> Mapping[str, Any] | None:
        """The view's index template as stored (``index_template``), or None."""
        name = self.changelog_template(view)
        found = self.client.transport.perform_request(
            "GET", f"/_index_template/{name}", params={"ignore": 404}, timeout=self.request_timeout
        )
        for t in (found or {}).get("index_templates") or ():
            if t.get("name") == name:
                return t.get("index_template") or {}
        return None

    def _get_templates(self) -> dict[str, Mapping[str, Any]]:
        """Every change-log template of this sink's prefix, by name (one request)."""
        found = self.client.transport.perform_request(
            "GET",
            f"/_index_template/{self.index_prefix}viewkeeper-changelog-*",
            params={
                "filter_path": "index_templates.name,index_templates.index_template._meta",
                "ignore": 404,  # none at all
            },
            timeout=self.request_timeout,
        )
        return {
            t["name"]: t.get("index_template") or {}
            for t in (found or {}).get("index_templates") or ()
            if isinstance(t, Mapping) and "name" in t
        }

    def _check_patterns(self, views: Sequence[View]) -> None:
        """Refuse an OpenSearch view whose index names fall under a change-log view's
        pattern ``P{index}-*`` (its template would give them the change-log's alias), and
        two views on one alias."""
        logs = {self.changelog_alias(v): v for v in views if _is_changelog(v)}
        for other in views:
            if other.kind != "opensearch" or other.index is None:
                continue
            names = ViewIndexes.of(other, self.index_prefix)
            for alias, log in logs.items():
                if other.name == log.name:
                    continue
                if names.alias == alias:
                    raise SinkError(
                        f"views {log.name!r} and {other.name!r} both use index {log.index!r} "
                        f"on OpenSearch connection {self.name!r}; give each view its own index"
                    )
                if not other.changelog and names.alias.startswith(alias + "-"):
                    raise SinkError(
                        f"view {other.name!r}: its index {other.index!r} falls under the daily "
                        f"indices {alias}-* of change-log view {log.name!r} (their template "
                        f"would give it the alias {alias!r}); rename one of the two indexes"
                    )

    # --- daily indices -----------------------------------------------------------------
    def _days(self, view: View) -> list[tuple[str, float, int]]:
        """The view's daily indices: (name, start of its UTC day, documents), oldest first."""
        alias = self.changelog_alias(view)
        day = _day_re(alias)
        tp = self.client.transport

        def list_days() -> Any:
            tp.perform_request(
                "POST",
                f"/{alias}-*/_refresh",
                params={"allow_no_indices": "true", "ignore_unavailable": "true"},
                timeout=self.request_timeout,
            )
            return tp.perform_request(
                "GET",
                f"/_cat/indices/{alias}-*",
                params={"format": "json", "h": "index,docs.count", "expand_wildcards": "all"},
                timeout=self.request_timeout,
            )

        found: list[tuple[str, float, int]] = []
        for row in self._call(list_days) or ():
            name = str(row.get("index", ""))
            m = day.match(name)
            if m is None:
                continue
            try:
                start = calendar.timegm(time.strptime(m[1], "%Y.%m.%d"))
            except ValueError:
                continue
            found.append((name, float(start), int(row.get("docs.count") or 0)))
        return sorted(found, key=lambda d: d[1])

    def _delete_days(self, view: View, days: list[tuple[str, float, int]]) -> int:
        tp = self.client.transport
        for part in _parts([name for name, _, _ in days]):
            self._call(
                lambda part=part: tp.perform_request(  # type: ignore[misc]
                    "DELETE",
                    f"/{','.join(part)}",
                    params={"ignore_unavailable": "true"},
                    timeout=self.maintenance_timeout,
                )
            )
        return sum(n for _, _, n in days)


def _is_changelog(view: View) -> bool:
    return view.kind == "opensearch" and view.changelog


def _vk(template: Mapping[str, Any]) -> Mapping[str, Any]:
    """``_meta.viewkeeper`` of a stored index template ({} when none)."""
    found = (template.get("_meta") or {}).get("viewkeeper")
    return found if isinstance(found, Mapping) else {}


def _day_re(alias: str) -> re.Pattern[str]:
    return re.compile(re.escape(alias) + r"-([0-9]{4}\.[0-9]{2}\.[0-9]{2})\Z")


def _parts(names: list[str]) -> list[list[str]]:
    return [names[i : i + _DELETE_AT_ONCE] for i in range(0, len(names), _DELETE_AT_ONCE)]
