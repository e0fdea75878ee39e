"""Prometheus metrics. One module owns every metric name, so dashboards have one reference.

The HTTP endpoint binds to 127.0.0.1 unless the config says otherwise (:func:`serve`).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "BATCH_SECONDS",
    "CAUGHT_UP",
    "COLLISIONS",
    "LAG",
    "LEASES",
    "RECORDS",
    "SHARD_FAILURES",
    "SINK_ERRORS",
    "SINK_RETRIES",
    "TRIMMED",
    "serve",
]

RECORDS = Counter(
    "viewkeeper_records_total",
    "Change records by view and final outcome (applied, stale, dead_lettered).",
    ["view", "outcome"],
)
LAG = Gauge(
    "viewkeeper_shard_lag_seconds",
    "Now minus ApproximateCreationDateTime of the last record read on the shard.",
    ["table", "shard"],
)
CAUGHT_UP = Gauge(
    "viewkeeper_shard_caught_up",
    "1 when the last read of the shard returned no more records.",
    ["table", "shard"],
)
BATCH_SECONDS = Histogram(
    "viewkeeper_batch_duration_seconds",
    "Time to project and apply one page of records.",
    ["table"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_ERRORS = Counter(
    "viewkeeper_sink_errors_total",
    "Sink failures by sink and kind (unavailable, rejected).",
    ["sink", "kind"],
)
SINK_RETRIES = Counter(
    "viewkeeper_sink_retries_total", "Batches retried because a sink was unavailable.", ["sink"]
)
LEASES = Gauge("viewkeeper_leases_held", "Shard leases held by this process.")
COLLISIONS = Counter(
    "viewkeeper_entry_collisions_total", "Entries claimed by two items (a view bug).", ["view"]
)
TRIMMED = Counter(
    "viewkeeper_trimmed_shards_total",
    "Shards whose unread records were trimmed by the stream: a rebuild is needed.",
    ["table"],
)
SHARD_FAILURES = Counter(
    "viewkeeper_shard_failures_total",
    "Shard workers that crashed and were restarted.",
    ["table"],
)
BEFORE_START = Counter(
    "viewkeeper_records_before_start_total",
    "Records read on reopening a shard first opened at LATEST that were written before that "
    "first opening (not part of the view's input; see starting_position).",
    ["table"],
)
STREAM_GAPS = Counter(
    "viewkeeper_stream_gaps_total",
    "A table's stream was disabled and enabled again: writes in between are in no stream, "
    "its views need a rebuild.",
    ["table"],
)
SINK_DATA_LOST = Counter(
    "viewkeeper_sink_data_lost_total",
    "Times a view's sink namespace was found to have lost its data (or re-armed after a loss).",
    ["view"],
)
VIEW_NEEDS_REBUILD = Gauge(
    "viewkeeper_view_needs_rebuild",
    "1 while a view is marked needs_rebuild (its sink lost data), as this process knows.",
    ["view"],
)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose the metrics on http://host:port/metrics (loopback unless configured)."""
    start_http_server(port, addr=host, registry=REGISTRY)
