"""The view's claim on a cluster: the hash ``vk:{VIEW}:ns`` and its marker in every slot.

Owns read_claim, write_claim and expect of the ``Sink`` protocol, the markers and write
counters each call checks in its slot (the script's first lines), and what a refusal means
(README.md, "Claims"): a slot that lost its data — a node restarted empty, a replica promoted
before it had every write, a FLUSHALL — is noticed by the first call there, which writes
nothing in it; the sink then erases the central claim's marker (if it is still the one
expected), so that every process and ``viewkeeper check`` see the namespace lost, as on
standalone, and the view is re-armed and rebuilt.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Claim, NamespaceLost, Owner, SinkError
from viewkeeper.sinks.redis.packing import _b, _text
from viewkeeper.sinks.redis_cluster.connection import SLOTS, Call, _Connection, log

# Erase the marker only if it is still the one the caller expected (another process may have
# re-armed the namespace meanwhile: then its new marker stays).
_ERASE = b"""
if redis.call('HGET', KEYS[1], 'marker') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'marker')
  redis.call('HSET', KEYS[1], 'lost', ARGV[2])
  return 1
end
return 0
"""

# The claim and its markers are written by script calls, so that _run sends them as it sends
# the changes: each master's in one pipeline, acknowledged once its replicas have them (a marker
# lost in a failover right after arming would be taken for a loss, and the view rebuilt).
_SET = b"""
redis.call('HDEL', KEYS[1], 'lost')
return redis.call('HSET', KEYS[1], unpack(ARGV))
"""
_SET_SHA = hashlib.sha1(_SET).hexdigest().encode()


class _Claims(_Connection):
    """Claims: central (``vk:{VIEW}:ns``) and per slot (fields of ``vk:{TAG}:c``)."""

    def read_claim(self, view: View) -> Claim | None:
        raw = self._with_retry(lambda: self._client.hgetall(self._claim_key(view)))
        if not raw or b"marker" not in raw:
            return None
        f = {k.decode(): _text(v) for k, v in raw.items()}
        owner = Owner(f.get("source", "?"), f.get("coordination", "?"), f.get("deployment", "?"))
        return Claim(owner, f["marker"], int(f.get("generation", "0") or 0))

    def write_claim(self, view: View, claim: Claim) -> None:
        """The claim; a new marker is first written to every slot (then the central hash:
        a crash in between leaves slots without it, noticed as a loss, never the reverse).
        The same marker again (a rebuild's announcement) is not: a slot that lost its data
        must not get it back unnoticed."""
        key = self._claim_key(view)
        marker = _b(claim.marker)
        had = self._with_retry(lambda: self._client.hget(key, "marker"))
        if had != marker:
            self._write_markers(view, marker)
        fields = [
            *(b"source", _b(claim.owner.source)),
            *(b"coordination", _b(claim.owner.coordination)),
            *(b"deployment", _b(claim.owner.deployment)),
            *(b"marker", marker),
            *(b"generation", _b(str(claim.generation))),
        ]
        self._set([([key], fields)])

    def _write_markers(self, view: View, marker: bytes) -> None:
        """The marker in every slot (a change-log view: in its stream's slot alone)."""
        field = b"#" + self._view_id(view.name)
        self._set([([self._claims_key(slot)], [field, marker]) for slot in range(SLOTS)])

    def _set(self, calls: list[Call]) -> None:
        """HSETs (each call: a key, then fields and values; its field `lost` deleted),
        acknowledged once their replicas have them."""
        for reply in self._run(calls, script=(_SET, _SET_SHA)):
            if isinstance(reply, BaseException):
                raise SinkError(
                    f"redis sink {self.name!r} ({self.where}): writing the view's claim: "
                    f"{self._scrub(str(reply))} (a key of viewkeeper's overwritten outside it? "
                    f"delete the keys under {self.key_prefix!r} of that view and rebuild it)"
                )

    def expect(self, view: View, marker: str | None) -> None:
        """From now on, each call checks ``view``'s marker in its slot, and the slot's write
        counter; a new marker starts the counters' check again."""
        want = None if marker is None else _b(marker)
        with self._seen_lock:
            if self._markers.get(view.name) != want:
                for k in [k for k in self._seen if k[0] == view.name]:
                    del self._seen[k]
            if want is None:
                self._markers.pop(view.name, None)
            else:
                self._markers[view.name] = want

    def _checks(self, views: list[str], slot: int) -> list[bytes]:
        """The arguments by which a call in ``slot`` checks these views' markers there."""
        args: list[bytes] = []
        with self._seen_lock:
            for view in views:
                marker = self._markers.get(view)
                if marker is not None:
                    seen = self._seen.get((view, slot), 0)
                    args += [self._view_id(view), marker, b"%d" % seen]
        return [b"%d" % (len(args) // 3), *args]

    def _checked(self, views: list[str]) -> list[str]:
        return [v for v in views if v in self._markers]

    def _refused(self, replies: list[Any], checked: list[list[str]], slots: list[int]) -> None:
        """Raise NamespaceLost for the views whose marker a call did not find (``{'L', i}``)
        or found with its write counter gone back (``{'L', i, 'back'}``), after erasing
        their central marker if it is still the one expected; else remember the highest
        write counters seen. ``checked``: per call, the views it checked, in order."""
        lost: dict[str, str] = {}
        for reply, views, slot in zip(replies, checked, slots, strict=True):
            if isinstance(reply, list) and reply and reply[0] == b"L":
                view = views[int(reply[1]) - 1]
                back = len(reply) > 2 and reply[2] == b"back"
                lost[view] = (
                    f"slot {slot}'s write counter went back (a replica promoted before it "
                    "had every write?)"
                    if back
                    else f"slot {slot} does not hold its marker"
                )
        if lost:
            self._lose(lost)
        pending = self._pending_seen  # remembered once the batch is acknowledged (_commit_seen)
        for reply, views, slot in zip(replies, checked, slots, strict=True):
            if isinstance(reply, BaseException):
                continue
            counters = reply[1]
            if not isinstance(counters, list) or len(counters) != len(views):
                raise self._unexpected(reply)
            for view, n in zip(views, counters, strict=True):
                key = (view, slot, self._markers.get(view))  # a re-arm: not these counters
                if n > pending.get(key, 0):
                    pending[key] = n

    def _lose(self, lost: dict[str, str]) -> None:
        erase = self._client.register_script(_ERASE)
        erased = []
        for view, why in sorted(lost.items()):
            marker = self._markers.get(view)
            if marker is None:
                continue
            text = f"{why}, seen by a client at {int(self._clock())}"
            key = self._claim_key(view)
            done: Any = self._with_retry(partial(erase, keys=[key], args=[marker, text]))
            if done:
                erased.append(view)
                log.error(
                    "redis sink %s (%s): view %s lost data in the cluster: %s; its claim's "
                    "marker is erased, so that every process sees the namespace lost and "
                    "the view is rebuilt",
                    self.name,
                    self.where,
                    view,
                    why,
                )
        self._ready = False
        views = sorted(lost)
        raise NamespaceLost(
            f"redis sink {self.name!r} ({self.where}): the claim of view(s) {', '.join(views)} "
            f"is not what this process expected ({'; '.join(lost[v] for v in views)}); "
            "nothing more was written",
            views,
        )
