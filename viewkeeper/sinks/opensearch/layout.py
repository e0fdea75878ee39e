"""Where a view's data lives on OpenSearch, and under which ids: the names behind a view's
alias (:class:`ViewIndexes`), the mappings of its two indexes, the ``_id`` of an item key
(:func:`item_id`), and the stored script's id and source.

See README.md § Layout, § Ids and § The stored script.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from viewkeeper.projection.api import View

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
    """The painless source of the stored script (shipped in this package)."""
    return (
        resources.files("viewkeeper.sinks.opensearch")
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
