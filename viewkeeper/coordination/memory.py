"""An in-memory coordination store: same semantics as the DynamoDB one, for fast tests."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable, Mapping

from viewkeeper.coordination.model import (
    DeadLetter,
    Lease,
    LeaseLost,
    LeaseState,
    ViewState,
    WorkerInfo,
    merge_generations,
)
from viewkeeper.projection.versions import padded_sequence

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], Lease] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._gens: dict[str, int] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._views: dict[str, ViewState] = {}
        self._deployment = uuid.uuid4().hex
        self._clock = clock

    def ensure(self) -> None:
        return None

    def list_leases(self, table: str) -> list[Lease]:
        with self._lock:
            return [self._copy(v) for (t, _), v in sorted(self._leases.items()) if t == table]

    def create_lease(self, lease: Lease) -> bool:
        with self._lock:
            key = (lease.table, lease.shard_id)
            if key in self._leases:
                return False
            self._leases[key] = self._copy(lease)
            return True

    def take_lease(
        self, lease: Lease, owner: str, gens: Mapping[str, int] | None = None
    ) -> Lease | None:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is None or cur.counter != lease.counter or cur.owner != lease.owner:
                return None
            cur.owner = owner
            cur.counter += 1
            cur.token = uuid.uuid4().hex[:16]
            cur.updated_at = self._clock()
            cur.gens = merge_generations(cur.gens, gens or {})
            return self._copy(cur)

    def renew_lease(
        self,
        lease: Lease,
        lag: float | None,
        caught_up: bool,
        *,
        tip_at: float | None = None,
        gens: Mapping[str, int] | None = None,
    ) -> Lease | None:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is None or cur.owner != lease.owner or cur.counter != lease.counter:
                return None
            cur.counter += 1
            cur.lag = lag
            cur.caught_up = caught_up
            cur.updated_at = self._clock()
            if tip_at is not None:
                cur.checkpoint_at = tip_at
            cur.gens = merge_generations(cur.gens, gens or {})
            return self._copy(cur)

    @staticmethod
    def _copy(lease: Lease) -> Lease:
        out = copy.copy(lease)
        out.gens = dict(lease.gens)
        return out

    def checkpoint(
        self,
        lease: Lease,
        sequence: str | None,
        state: LeaseState | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is None or cur.owner != lease.owner or cur.token != lease.token:
                raise LeaseLost(
                    f"lease on {lease.table}/{lease.shard_id} is held by "
                    f"{cur.owner if cur else 'nobody'}"
                    + (" (taken again since)" if cur and cur.owner == lease.owner else "")
                )
            if sequence is not None:
                new, old = padded_sequence(sequence), padded_sequence(cur.checkpoint or "")
                if new is not None and old is not None and new < old:
                    raise LeaseLost(
                        f"checkpoint of {lease.table}/{lease.shard_id} would move backwards "
                        f"from {cur.checkpoint} to {sequence}"
                    )
                cur.checkpoint = sequence
                cur.checkpoint_at = self._clock()
            if state is not None:
                cur.state = state
            cur.error = error
            cur.updated_at = self._clock()

    def release_lease(self, lease: Lease) -> None:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is not None and cur.owner == lease.owner:
                cur.owner = None
                cur.counter += 1

    def revoke_lease(self, lease: Lease, gens: Mapping[str, int] | None = None) -> bool:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is None or cur.owner != lease.owner or cur.counter != lease.counter:
                return False
            cur.owner = None
            cur.counter += 1
            cur.gens = merge_generations(cur.gens, gens or {})
            return True

    def publish_generations(self, lease: Lease, gens: Mapping[str, int]) -> bool:
        with self._lock:
            cur = self._leases.get((lease.table, lease.shard_id))
            if cur is None or cur.owner is not None or cur.counter != lease.counter:
                return False
            cur.counter += 1
            cur.gens = merge_generations(cur.gens, gens)
            return True

    def reset_lease(
        self, table: str, shard_id: str, checkpoint: str | None, state: LeaseState
    ) -> None:
        with self._lock:
            cur = self._leases[(table, shard_id)]
            cur.checkpoint = checkpoint
            cur.checkpoint_at = self._clock()  # the position is "now" for the next reader
            cur.state = state
            cur.error = None
            cur.counter += 1

    def delete_lease(self, table: str, shard_id: str) -> None:
        with self._lock:
            self._leases.pop((table, shard_id), None)

    def put_worker(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.worker_id] = copy.deepcopy(info)

    def list_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [copy.deepcopy(w) for w in self._workers.values()]

    def delete_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def generations(self) -> dict[str, int]:
        with self._lock:
            return dict(self._gens)

    def raise_generation(self, view: str) -> int:
        with self._lock:
            self._gens[view] = self._gens.get(view, 0) + 1
            return self._gens[view]

    def deployment(self) -> str:
        return self._deployment

    def view_states(self) -> dict[str, ViewState]:
        with self._lock:
            return {k: copy.copy(v) for k, v in self._views.items()}

    def set_marker(self, view: str, marker: str) -> None:
        with self._lock:
            self._views.setdefault(view, ViewState(view)).marker = marker

    def record_first_marker(self, view: str, marker: str) -> str:
        with self._lock:
            state = self._views.setdefault(view, ViewState(view))
            if state.marker is None:
                state.marker = marker
            return state.marker

    def mark_needs_rebuild(self, view: str, reason: str, at: float, marker: str | None) -> None:
        with self._lock:
            state = self._views.setdefault(view, ViewState(view))
            if marker is not None:
                state.marker = marker
            state.losses += 1
            if not state.needs_rebuild:
                state.needs_rebuild, state.reason, state.since = True, reason, at

    def clear_needs_rebuild(self, view: str, marker: str, losses: int | None = None) -> bool:
        with self._lock:
            state = self._views.get(view)
            if state is None or not state.needs_rebuild or state.marker != marker:
                return False
            if losses is not None and state.losses != losses:
                return False
            state.needs_rebuild, state.reason, state.since = False, None, None
            return True

    def put_deadletter(self, dl: DeadLetter) -> None:
        with self._lock:
            stored = copy.deepcopy(dl)
            old = self._dead.get(dl.id)
            if old is not None:
                stored.created_at = old.created_at
                if old.generation is not None and (stored.generation or -1) < old.generation:
                    stored.generation = old.generation  # the highest reader's stamp stays
            self._dead[dl.id] = stored

    def list_deadletters(self, limit: int = 1000) -> list[DeadLetter]:
        with self._lock:
            return [copy.deepcopy(d) for _, d in sorted(self._dead.items())][:limit]

    def get_deadletter(self, dl_id: str) -> DeadLetter | None:
        with self._lock:
            dl = self._dead.get(dl_id)
            return copy.deepcopy(dl) if dl is not None else None

    def delete_deadletter(self, dl_id: str) -> None:
        with self._lock:
            self._dead.pop(dl_id, None)
