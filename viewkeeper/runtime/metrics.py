"""Prometheus metrics. One module owns every metric name, so dashboards have one reference.

The HTTP endpoint binds to 127.0.0.1 unless the config says otherwise (:func:`serve`).

Several processes on one host (``run --processes N``, :mod:`viewkeeper.ops.processes`): each
child writes its figures to files in ``$PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode, chosen when that variable is set before this module is imported: the
parent sets it in each child's environment) and the parent serves them, aggregated, on the
one endpoint. Counters and histograms are summed over every child that ever ran (a
restarted child does not make a counter go down). Gauges say how they combine:

- per shard (lag, caught up): ``livemostrecent`` — a shard has one reader at a time, and the
  last value written is the current reader's; ``max`` would keep a former holder's stale
  lag after the shard moved to a sibling;
- leases held: ``liveall``, one series per live child (the parent names it with a
  ``process`` label, the child's index); ``sum(viewkeeper_leases_held)`` is the host's;
- a view needs a rebuild: ``livemax`` — 1 when any live child knows it.

``live*``: a child that exited is removed at once (the parent calls
``mark_process_dead``). In one process these modes are ignored: the figures are today's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    start_http_server,
)
from prometheus_client.registry import Collector

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
    multiprocess_mode="livemostrecent",
)
CAUGHT_UP = Gauge(
    "viewkeeper_shard_caught_up",
    "1 when the last read of the shard returned no more records.",
    ["table", "shard"],
    multiprocess_mode="livemostrecent",
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
LEASES = Gauge(
    "viewkeeper_leases_held",
    "Shard leases held by this process (with several: per process, label process).",
    multiprocess_mode="liveall",
)
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
    multiprocess_mode="livemax",
)


def serve(
    port: int,
    host: str = "127.0.0.1",
    multiprocess_dir: str | None = None,
    process_of: Callable[[str], str] | None = None,
) -> Any:
    """Expose the metrics on http://host:port/metrics (loopback unless configured); the
    server (``shutdown()`` stops it). With ``multiprocess_dir``: the figures the processes
    writing there (children with ``$PROMETHEUS_MULTIPROC_DIR``) aggregated, their ``pid``
    label named ``process`` by ``process_of(pid)``."""
    registry: Any = REGISTRY
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        registry.register(_Children(multiprocess_dir, process_of or (lambda pid: pid)))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


class _Children(Collector):
    """The children's figures from the multiprocess folder, with the ``pid`` label of the
    ``liveall`` gauges replaced by ``process``."""

    def __init__(self, path: str, process_of: Callable[[str], str]) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._inner = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        self._process_of = process_of

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():  # type: ignore[no-untyped-call]
            samples = []
            for sample in metric.samples:
                labels = dict(sample.labels)
                pid = labels.pop("pid", None)
                if pid is not None:
                    labels["process"] = self._process_of(pid)
                samples.append(sample._replace(labels=labels))
            metric.samples = samples
            yield metric
