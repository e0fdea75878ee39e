"""`viewkeeper status`: how far behind am I, per shard, read from the coordination table.

Each shard names its holder's host and pid (from the holder's worker row): with several
processes per host (``run --processes N``, or separate instances) the worker id alone does
not say which process to look at."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from viewkeeper.coordination.model import CoordinationStore, LeaseState

__all__ = ["collect", "format_table"]


def collect(
    store: CoordinationStore, tables: list[str], now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    workers = store.list_workers()
    by_id = {w.worker_id: w for w in workers}
    shards: list[dict[str, Any]] = []
    for table in tables:
        for lease in store.list_leases(table):
            row = asdict(lease)
            row["state"] = lease.state.value
            row["parents"] = list(lease.parents)
            row["age"] = round(now - lease.updated_at, 1) if lease.updated_at else None
            holder = by_id.get(lease.owner) if lease.owner else None
            row["host"] = holder.host if holder is not None else None
            row["pid"] = holder.pid if holder is not None else None
            shards.append(row)
    return {
        "generated_at": now,
        "workers": [asdict(w) | {"heartbeat_age": round(now - w.heartbeat_at, 1)} for w in workers],
        "generations": store.generations(),
        "views": {name: asdict(state) for name, state in sorted(store.view_states().items())},
        "shards": shards,
        "dead_letters": len(store.list_deadletters(limit=10000)),
    }


def _lag(lease: dict[str, Any]) -> str:
    if lease["state"] == LeaseState.ENDED.value:
        return "-"
    if lease["lag"] is None:
        return "?"
    return f"{lease['lag']:.1f}s" + ("" if lease["caught_up"] else "+")


def _holder(lease: dict[str, Any]) -> str:
    if not lease.get("owner"):
        return "-"
    if not lease.get("host"):
        return "?"  # its worker row is gone (it stopped, or died two lease durations ago)
    return f"{lease['host']}/{lease['pid']}"


def format_table(data: dict[str, Any]) -> str:
    lines = []
    header = (
        f"{'TABLE':<16} {'SHARD':<38} {'OWNER':<28} {'HOST/PID':<24} {'STATE':<14} {'LAG':>8}  "
        "CHECKPOINT"
    )
    lines.append(header)
    for s in data["shards"]:
        cp = s["checkpoint"] or "-"
        if len(cp) > 24:
            cp = "…" + cp[-23:]
        state = s["state"] + ("!" if s.get("error") else "")
        lines.append(
            f"{s['table'][:16]:<16} {s['shard_id'][-38:]:<38} "
            f"{(s['owner'] or '-')[:28]:<28} {_holder(s)[:24]:<24} {state:<14} {_lag(s):>8}  {cp}"
        )
        if s.get("error"):
            lines.append(f"{'':<16} ↳ {s['error'][:200]}")
    active = [s for s in data["shards"] if s["state"] == LeaseState.ACTIVE.value]
    worst = max((s["lag"] or 0.0 for s in active), default=0.0)
    lines.append("")
    lines.append(
        f"{len(data['shards'])} shards ({len(active)} active), "
        f"{len(data['workers'])} workers, worst lag {worst:.1f}s, "
        f"{data['dead_letters']} dead letters"
    )
    for w in data["workers"]:
        lines.append(
            f"  worker {w['worker_id']} on {w['host']} pid {w['pid']}: {w['leases']} "
            f"leases, heartbeat {w['heartbeat_age']:.0f}s ago, generations "
            f"{w['acked'] or '{}'}"
        )
    problems = [
        s
        for s in data["shards"]
        if s["state"] in (LeaseState.NEEDS_REBUILD.value, LeaseState.HALTED.value)
    ]
    for s in problems:
        lines.append(
            f"ATTENTION {s['table']}/{s['shard_id']} is {s['state']}: run "
            f"`viewkeeper rebuild --table {s['table']}` (or see `deadletters list`)"
        )
    for name, v in data.get("views", {}).items():
        if v.get("needs_rebuild"):
            lines.append(
                f"ATTENTION view {name} needs a rebuild: {v.get('reason') or '?'}; run "
                f"`viewkeeper rebuild {name}`"
            )
    return "\n".join(lines)
