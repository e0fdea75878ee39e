"""Maintenance: sweep, purge and wipe, and the owner records read back.

Owns the ``Sink`` protocol's sweep (a rebuild's end; its counters: sums.py), purge_tombstones
and wipe, all built on
the owner records ``vk:{view}:o:{bucket}`` (README.md, "Key layout"; their encoding:
"Encodings"), and the readers checkers and tests use: owned_entries, iter_owner_records.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterator
from functools import partial
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.projection.versions import Version
from viewkeeper.sinks.base import Change
from viewkeeper.sinks.redis.packing import Ident, OwnerRecord, _b, _parse_record
from viewkeeper.sinks.redis.sums import _Sums


class _Maintenance(_Sums):
    """What runs beside the stream: rebuild sweeps, tombstone purges, wipes, and reads."""

    def sweep(self, view: View, generation: int, now: float, keep: Collection[str] = ()) -> int:
        """Retract and tombstone items whose record is older than ``generation`` (rebuild),
        except those in ``keep``; then set the view's counters to the rebuild's sums
        (:meth:`begin_rebuild`). Raises SinkError when a retraction stays refused."""
        sweep = self._sweeping(view, generation)  # before the owner records are listed
        changes = [
            Change(view, rec.item_key, Version(generation, "0"), [])
            for rec in self.iter_owner_records(view)
            if rec.version.generation < generation and rec.entries and rec.item_key not in keep
        ]
        retracted = self._retract_all(f"view {view.name}: the sweep", changes, now)
        if sweep is not None:
            self._finish_sums(view, sweep, keep)
        return retracted

    def purge_tombstones(self, view: View | str, older_than: float | None = None) -> int:
        """Forget tombstones deleted before ``older_than`` (default: now - retention)."""
        cutoff = int(self._clock() - self.tombstone_retention if older_than is None else older_than)
        per_bucket: dict[bytes, list[bytes]] = {}
        for rec in self.iter_owner_records(view):
            if rec.deleted_at is not None and rec.deleted_at < cutoff:
                item = _b(rec.item_key)
                per_bucket.setdefault(self._owner_key(view, item), []).append(item)
        purged = 0
        for key, items in per_bucket.items():

            def purge(k: bytes = key, i: list[bytes] = items) -> int:
                return int(self._purge(keys=[k], args=[cutoff, *i]))

            purged += self._with_retry(purge)
        return purged

    def wipe(self, view: View) -> int:
        """Retract every entry the view's owner records own (at a version above any a
        deployment can have written), then delete its owner records and a rebuild's sums.
        Raises SinkError, deleting nothing more, when a retraction stays refused."""
        top = Version(2**63, "0")
        changes = [
            Change(view, rec.item_key, top, [])
            for rec in self.iter_owner_records(view)
            if rec.entries
        ]
        retracted = self._retract_all(f"view {view.name}: the wipe", changes, self._clock())
        keys = [self._bucket_key(view, b) for b in range(self.owner_buckets)]
        keys.append(self._sums_key(view))
        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]
            self._with_retry(lambda part=part: self._client.delete(*part))  # type: ignore[misc]
        ns = self._claim_key(view)
        fields = ("shadow", "shadow_id", "shadow_epoch", "sweeping", "top")  # sums.py
        self._with_retry(lambda: self._client.hdel(ns, *fields))
        return retracted

    # -- helpers for tests and checkers --------------------------------------------------------
    def owned_entries(self, view: View | str, item_key: str) -> list[Ident] | None:
        """The identities the item owns (``[]`` for a tombstone), or None without a record."""
        item = _b(item_key)
        raw = self._with_retry(lambda: self._client.hget(self._owner_key(view, item), item))
        return None if raw is None else list(_parse_record(item, raw).entries)

    def iter_owner_records(self, view: View | str) -> Iterator[OwnerRecord]:
        """Every owner record of the view (tombstones included), bucket by bucket."""
        step = 256
        for first in range(0, self.owner_buckets, step):
            keys = [
                self._bucket_key(view, b)
                for b in range(first, min(first + step, self.owner_buckets))
            ]

            def scan(keys: list[bytes] = keys) -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hscan(key, 0, count=1000)
                return list(pipe.execute())

            for key, (cursor, fields) in zip(keys, self._with_retry(scan), strict=True):
                if cursor:  # a bucket past listpack size: scan it to the end
                    fields = self._with_retry(partial(self._hscan_all, key))
                for item, raw in fields.items():
                    yield _parse_record(item, raw)

    # -- internals -------------------------------------------------------------------------
    def _bucket_key(self, view: View | str, bucket: int) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + _b(name) + b":o:%d" % bucket  # as _args_for builds it

    def _owner_key(self, view: View | str, item: bytes) -> bytes:
        return self._bucket_key(view, zlib.crc32(item) % self.owner_buckets)

    def _hscan_all(self, key: bytes) -> dict[bytes, bytes]:
        return dict(self._client.hscan_iter(key, count=1000))
