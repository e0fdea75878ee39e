"""Run the same view modules inside AWS Lambda, on a DynamoDB Streams event source.

Configure the function with ``VIEWKEEPER_CONFIG`` (path of the usual YAML file, packaged with
the function) and the event source mapping with ``FunctionResponseTypes:
[ReportBatchItemFailures]``. Handler: ``viewkeeper.ops.lambda_handler.handler``.

Outcomes map to Lambda's partial batch response: applied, stale and dead-lettered records are
done (a dead letter is stored durably in the coordination table, as in the daemon; a malformed
record — bad DynamoDB JSON, or an ``eventSourceARN`` that is not a stream's — is dead-lettered
too, with its raw record and its error). When a sink is unavailable — or
``worker.on_error: halt`` stops on a bad record — the handler reports the first record not
yet done as the failure; Lambda then retries from that record, so nothing after it is
skipped (records are in order within a shard). Set the mapping's maximum record age to -1
(the default, never) and its retry attempts to -1: a batch this handler fails is one a sink
could not take, and it must come again, not go to an on-failure destination.

Rebuilds (why the handler is safe without taking part in the handshake): a Lambda holds no
lease, so ``viewkeeper rebuild`` cannot wait for it. It needs no waiting: the handler reads
the views' generations at the start of every invocation, after the poller read the event's
records. An invocation that read generation ``G - 1`` started before the rebuild raised
``G``, so its records were written before the rebuild's scan read any item, and losing to
the scan's ``(G, 0)`` is right; every later invocation stamps ``(G, seq)`` and beats it.
That costs one Query of the coordination table per invocation (a few ms).

The coordination table is created on a cold start when ``coordination.create_if_missing``
is true (the default), as ``viewkeeper run`` does. The function's role needs (``REGION``,
``ACCOUNT``, ``TABLE`` and the coordination table's name filled in)::

    {"Version": "2012-10-17", "Statement": [
      {"Effect": "Allow",
       "Action": ["dynamodb:DescribeStream", "dynamodb:GetRecords",
                  "dynamodb:GetShardIterator", "dynamodb:ListStreams"],
       "Resource": "arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE/stream/*"},
      {"Effect": "Allow", "Action": ["dynamodb:DescribeTable"],
       "Resource": ["arn:aws:dynamodb:REGION:ACCOUNT:table/TABLE",
                    "arn:aws:dynamodb:REGION:ACCOUNT:table/viewkeeper-coordination"]},
      {"Effect": "Allow",
       "Action": ["dynamodb:Query", "dynamodb:PutItem", "dynamodb:UpdateItem",
                  "dynamodb:CreateTable"],
       "Resource": "arn:aws:dynamodb:REGION:ACCOUNT:table/viewkeeper-coordination"}]}

(the first statement is what the event source mapping itself needs; drop ``CreateTable``
when the table is made beforehand and ``create_if_missing`` is false), plus network access
to the Redis / OpenSearch endpoints of the config (a VPC function for ElastiCache) and, for
Amazon OpenSearch with SigV4, ``es:ESHttpPost``/``es:ESHttpPut``/``es:ESHttpGet``/
``es:ESHttpHead`` on the domain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from viewkeeper.coordination.model import CoordinationStore
from viewkeeper.runtime.pipeline import HaltShard, Pipeline
from viewkeeper.sinks.base import SinkUnavailable
from viewkeeper.stream.records import ChangeRecord, decode_records, invalid_record

__all__ = ["handle_event", "handler", "table_of"]

log = logging.getLogger("viewkeeper.lambda")

_RUNTIME: tuple[Pipeline, Callable[[str], tuple[str, ...]], CoordinationStore] | None = None


def table_of(event_source_arn: str) -> str:
    """``arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL`` → ``NAME``."""
    try:
        return event_source_arn.split(":table/", 1)[1].split("/stream/", 1)[0]
    except IndexError:
        raise ValueError(
            f"eventSourceARN {event_source_arn!r} is not a DynamoDB stream ARN "
            "(…:table/NAME/stream/LABEL)"
        ) from None


def _table_or_none(raw: Any) -> str | None:
    arn = raw.get("eventSourceARN") if isinstance(raw, Mapping) else None
    try:
        return table_of(arn) if isinstance(arn, str) else None
    except ValueError:
        return None


def handle_event(
    event: Mapping[str, Any],
    pipeline: Pipeline,
    key_names_of: Callable[[str], tuple[str, ...]],
    generations: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Apply one Lambda event at ``generations`` (read after the event's records: see the
    module doc); return the ReportBatchItemFailures response.

    A malformed record is dead-lettered for every view of its table, with its raw record and
    its error (sequence ``"0"`` when it has none), like in the daemon: the batch goes on.
    Its table is read from its eventSourceARN, else taken from the other records (an event
    source mapping reads one stream); a record whose eventSourceARN is there but not a
    stream's is malformed too. Only when no record of the event names a table is the batch
    failed from its first record, so that Lambda's retries keep it — never dropped.
    """
    raw_records: Sequence[Mapping[str, Any]] = event.get("Records", [])
    records = decode_records(raw_records)
    tables = [_table_or_none(raw) for raw in raw_records]
    batch_table = next((t for t in tables if t is not None), None)
    by_table: dict[str, list[ChangeRecord]] = {}
    order: list[tuple[str, ChangeRecord]] = []
    for raw, rec, table in zip(raw_records, records, tables, strict=True):
        if rec.invalid is None and table is None:
            arn = raw.get("eventSourceARN") if isinstance(raw, Mapping) else None
            rec = invalid_record(
                raw,
                f"eventSourceARN {arn!r:.200} is not a DynamoDB stream ARN "
                "(arn:aws:dynamodb:REGION:ACCOUNT:table/NAME/stream/LABEL): the event did "
                "not come from a DynamoDB Streams event source mapping",
            )
        if rec.invalid is not None:
            log.error("malformed stream record %s: %s", rec.sequence, rec.invalid)
            table = table or batch_table
            if table is None:
                log.error("no record of the event names its table; failing the whole batch")
                return {"batchItemFailures": [{"itemIdentifier": records[0].sequence}]}
        assert table is not None
        by_table.setdefault(table, []).append(rec)
        order.append((table, rec))
    for table, recs in by_table.items():
        try:
            pipeline.process(table, key_names_of(table), recs, generations=generations)
        except (SinkUnavailable, HaltShard) as exc:
            first = next(r for t, r in order if t == table)
            log.error(
                "batch for %s not applied (%s); Lambda will retry from %s",
                table,
                exc,
                first.sequence,
            )
            return {"batchItemFailures": [{"itemIdentifier": first.sequence}]}
    return {"batchItemFailures": []}


def handler(event: Mapping[str, Any], context: object) -> dict[str, Any]:
    """The Lambda entry point; the runtime is built once per container from the config (the
    coordination table is created then when missing), the generations read every time."""
    global _RUNTIME
    if _RUNTIME is None:
        from viewkeeper.app import App

        path = os.environ.get("VIEWKEEPER_CONFIG", "viewkeeper.yaml")
        app = App.from_file(path)
        app.store.ensure()
        app.claim()  # refuses a namespace of another deployment (viewkeeper.runtime.namespaces)
        _RUNTIME = (app.pipeline(), app.key_names, app.store)
    pipeline, key_names_of, store = _RUNTIME
    return handle_event(event, pipeline, key_names_of, store.generations())
