"""The view's claim: the hash ``vk:{view}:ns`` and what each script call checks in it.

Owns reading and writing the claim, :meth:`_Claims.expect` (the marker and the write counter
each call checks from then on), a call's claim checks, the refusals the script answers for
them (``{'L', i}``, ``{'L', i, 'back'}``: NamespaceLost) and the highest write counter seen
per view. README.md, "Claims" ("The marker", "The write counter").
"""

from __future__ import annotations

from typing import Any

import redis

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import Claim, NamespaceLost, Owner
from viewkeeper.sinks.redis.connection import _Connection, log
from viewkeeper.sinks.redis.packing import _b, _Batch, _text


class _Claims(_Connection):
    """The claim of each view the sink writes (the ``Sink`` protocol's read_claim,
    write_claim and expect), and the checks of it in every script call."""

    def _claim_key(self, view: View | str) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + _b(name) + b":ns"

    def read_claim(self, view: View) -> Claim | None:
        def read() -> Any:
            try:
                return self._client.hgetall(self._claim_key(view))
            except redis.ResponseError as exc:
                if "WRONGTYPE" in str(exc):
                    return None  # overwritten by something else: no claim (the script says 'L')
                raise

        raw = self._with_retry(read)
        if not raw or b"marker" not in raw:
            return None
        f = {k.decode(): _text(v) for k, v in raw.items()}
        owner = Owner(f.get("source", "?"), f.get("coordination", "?"), f.get("deployment", "?"))
        return Claim(owner, f["marker"], int(f.get("generation", "0") or 0))

    def write_claim(self, view: View, claim: Claim) -> None:
        key = self._claim_key(view)
        fields = {
            "source": claim.owner.source,
            "coordination": claim.owner.coordination,
            "deployment": claim.owner.deployment,
            "marker": claim.marker,
            "generation": str(claim.generation),
        }

        def write() -> None:
            # the write counter (n) stays: a claim written again under the same marker (a
            # rebuild's announce) must not look like a server that went back in time
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(key, "lost")
            pipe.hset(key, mapping=fields)
            try:
                pipe.execute()
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                self._client.delete(key)  # not a hash: overwritten, no claim in it
                self._client.hset(key, mapping=fields)

        self._with_retry(write)

    def expect(self, view: View, marker: str | None) -> None:
        """From now on, each script call checks ``view``'s claim: its marker and its write
        counter (see README.md, "Claims"); a new marker starts the counter's check again."""
        want = None if marker is None else _b(marker)
        with self._seen_lock:
            if self._markers.get(view.name) != want:
                self._seen.pop(view.name, None)
            if want is None:
                self._markers.pop(view.name, None)
            else:
                self._markers[view.name] = want

    def _check(self, batch: _Batch, view: str) -> None:
        """Make the call of ``batch`` check ``view``'s claim, when a marker is expected."""
        marker = self._markers.get(view)
        if marker is not None and not any(c[0] == view for c in batch.checks):
            batch.checks.append((view, self._claim_key(view), marker))

    def _refuse_lost(self, batches: list[_Batch]) -> None:
        """A call refused for a claim (``{'L', i}``: it does not hold its marker; ``{'L', i,
        'back'}``: its write counter went back, and the script erased its marker) wrote
        none of its changes (and the calls after it check the same claims): raise
        NamespaceLost for those views. The view ids and bookkeeping meta of a Redis that
        lost its data are gone too: learnt again."""
        lost: set[str] = set()
        back: set[str] = set()
        for b in batches:
            reply = b.reply
            if isinstance(reply, list) and reply and reply[0] == b"L":
                view = b.checks[int(reply[1]) - 1][0]
                lost.add(view)
                if len(reply) > 2 and reply[2] == b"back":
                    back.add(view)
        if not lost:
            return
        self._view_ids.clear()
        self._view_names.clear()
        self._ready = False
        for view in sorted(back):
            log.error(
                "redis sink %s (%s): view %s went back in time: its claim's write counter is "
                "below what this process saw (Redis restarted from an older RDB or AOF "
                "snapshot, or a replica that had not received every write was promoted); "
                "writes acknowledged since are lost. Its claim's marker is erased, so that "
                "every process sees the namespace as lost and the view is rebuilt",
                self.name,
                self.where,
                view,
            )
        why = "does not hold the expected marker"
        if back:
            why += f" (view(s) {', '.join(sorted(back))}: the server went back in time)"
        raise NamespaceLost(
            f"redis sink {self.name!r} ({self.where}): the claim of view(s) "
            f"{', '.join(sorted(lost))} {why}; nothing was written",
            sorted(lost),
        )

    def _learn_counters(self, batches: list[_Batch]) -> None:
        """Remember the highest write counter each view's claim answered (see README.md,
        "Claims"): a later call that finds it lower knows the server went back in time."""
        seen = self._seen
        with self._seen_lock:
            for b in batches:
                reply = b.reply
                if not (isinstance(reply, list) and len(reply) > 1 and b.checks):
                    continue
                counters = reply[1]
                if not isinstance(counters, list) or len(counters) != len(b.checks):
                    raise self._unexpected(reply)
                for (view, _, marker), n in zip(b.checks, counters, strict=True):
                    # counters of another marker are not this one's (expect() reset it)
                    if self._markers.get(view) == marker and n > seen.get(view, 0):
                        seen[view] = n
