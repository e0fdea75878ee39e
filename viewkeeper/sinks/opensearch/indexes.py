"""A view's indexes on OpenSearch: the stored script, the owner indexes' template, the live
index behind the view's alias and the owner index (made, checked, adopted after a loss), and
the view's claim, held in the ``_meta`` of both.

See README.md § Layout, § Claims and lost indexes and § The stored script.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opensearchpy.exceptions import AuthenticationException, AuthorizationException, TransportError

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Claim, Owner, SinkError
from viewkeeper.sinks.encoding import dumps
from viewkeeper.sinks.opensearch.cache import _Cache
from viewkeeper.sinks.opensearch.layout import (
    LIVE_MAPPINGS,
    OWNERS_FORMAT,
    OWNERS_MAPPINGS,
    OWNERS_SUFFIX,
    ViewIndexes,
    script_source,
)
from viewkeeper.sinks.opensearch.transport import (
    _JSON,
    _error_text,
    _exc_text,
    _is_transient,
    _reason_of,
    _scrub,
    _short,
)

log = logging.getLogger("viewkeeper.sinks.opensearch")

_CLAIM_READS = 5  # reads of two claims that differ before read_claim says lost
_CLAIM_REREAD = 0.2  # seconds between them (a claim being written: a request or two)


class _Indexes(_Cache):
    """The view's indexes, alias, template, stored script and claim (a mixin of
    :class:`OpenSearchSink`)."""

    index_prefix: str
    index_settings: dict[str, Any]
    script_id: str
    _prepared: dict[str, ViewIndexes]
    _markers: dict[str, str]

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
        held = _claim_meta(claim)
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


def _vk_meta(mappings: Mapping[str, Any], index: str) -> dict[str, Any] | None:
    """``_meta.viewkeeper`` of ``index`` in a ``_mapping`` answer: None when the index is not
    in it (missing), ``{}`` when it has none (not made by viewkeeper)."""
    if index not in mappings:
        return None
    meta = ((mappings[index] or {}).get("mappings") or {}).get("_meta") or {}
    found = meta.get("viewkeeper")
    return dict(found) if isinstance(found, Mapping) else {}


def _claim_meta(claim: Claim) -> dict[str, Any]:
    """``claim`` as stored in an index's (or template's) ``_meta``; :func:`_claim_of` reads it."""
    return {
        "source": claim.owner.source,
        "coordination": claim.owner.coordination,
        "deployment": claim.owner.deployment,
        "marker": claim.marker,
        "generation": claim.generation,
    }


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
