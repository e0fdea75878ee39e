"""Change-log views of the end-to-end tests (table ``e2e-log``)."""

from viewkeeper import StreamChange, changelog_view

TABLE = "e2e-log"


@changelog_view(table=TABLE, redis="cache", stream="log:events", maxlen=1_000_000)
def log_events(change: StreamChange) -> dict[str, object]:
    return {
        "pk": change.keys["pk"],
        "event": change.event,
        "seq": change.sequence,
        "n": (change.new or {}).get("n", ""),
        "was": (change.old or {}).get("n", ""),
    }


@changelog_view(table=TABLE, opensearch="search", index="log-audit", retention_days=30)
def log_audit(change: StreamChange) -> dict[str, object]:
    return {
        "pk": change.keys["pk"],
        "event": change.event,
        "at": change.time.isoformat(),
        "before": dict(change.old) if change.old else None,
        "after": dict(change.new) if change.new else None,
    }
