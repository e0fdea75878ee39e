"""A Lambda-style applier: viewkeeper's Lambda handler fed the way Lambda's poller feeds it.

A thread of the test process reads the table's stream (moto has one shard) with boto3, as
the event source mapping does, in batches of 1-100 records (a new size per batch), turns
each batch into a Lambda event -- the records in their wire form (DynamoDB JSON with base64
binaries, ``ApproximateCreationDateTime`` in epoch seconds) plus ``eventSourceARN`` -- and
calls :func:`viewkeeper.ops.lambda_handler.handler` with ``VIEWKEEPER_CONFIG`` pointing at
the harness's direct config. As Lambda with ``ReportBatchItemFailures``: a
``batchItemFailures`` answer means "retry from that record" (after a short sleep: the
mapping's retries), the records before it are done; an exception (a function error)
retries the whole batch, in a new container (the runtime is built again: a cold start).
Nothing is ever skipped (maximum record age and retry attempts unlimited, as the handler's
docs ask).

It applies to the same Redis and OpenSearch as the daemons, directly and concurrently, and
holds no lease: rebuilds do not wait for it (the handler reads the generations at every
invocation, after its records were read). :meth:`LambdaApplier.finish` lets it read the
stream to its end first: a real mapping never stops half-way, and an applier abandoned
behind the daemons after a rebuild would leave older records stamped with the new
generation over newer ones the daemons stamped with the old (two readers of one stream:
each converges only by reading on to the end).
"""

from __future__ import annotations

import base64
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tests.testbed.dynamo import boto3_client
from viewkeeper.ops import lambda_handler

__all__ = ["Hold", "LambdaApplier", "wire_record"]


def _wire_value(value: Mapping[str, Any]) -> dict[str, Any]:
    """One attribute value as the wire carries it (boto3 decoded the base64 of binaries)."""
    (kind, v), *_ = value.items()
    if kind == "B":
        return {"B": base64.b64encode(v).decode()}
    if kind == "BS":
        return {"BS": [base64.b64encode(b).decode() for b in v]}
    if kind == "M":
        return {"M": {k: _wire_value(x) for k, x in v.items()}}
    if kind == "L":
        return {"L": [_wire_value(x) for x in v]}
    return {kind: v}


def wire_record(record: Mapping[str, Any], stream_arn: str) -> dict[str, Any]:
    """A GetRecords record as Lambda passes it to the function."""
    body = dict(record["dynamodb"])
    for part in ("Keys", "NewImage", "OldImage"):
        if part in body:
            body[part] = {k: _wire_value(v) for k, v in body[part].items()}
    when = body.get("ApproximateCreationDateTime")
    if hasattr(when, "timestamp"):
        body["ApproximateCreationDateTime"] = int(when.timestamp())
    return {**record, "dynamodb": body, "eventSourceARN": stream_arn}


@dataclass
class Hold:
    """Stops the applier once, between reading a batch and invoking the handler with it:
    ``reached`` is set there, and it goes on when the test sets ``release``."""

    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class LambdaApplier:
    """The handler on the table's stream, in a thread, until :meth:`finish` or :meth:`stop`."""

    def __init__(
        self,
        *,
        dynamodb_url: str,
        table: str,
        config: Path,
        rng: random.Random,
        note: Callable[[str], None],
    ) -> None:
        self.dynamodb_url = dynamodb_url
        self.table = table
        self.config = config
        self.rng = rng
        self.note = note
        self.invocations = 0
        self.records = 0  # records done (a record retried counts once)
        self.batch_failures = 0  # batchItemFailures answers, each retried from its record
        self.function_errors = 0  # exceptions out of the handler: the batch retried whole
        self.cold_starts = 0
        self.read_errors = 0  # GetRecords calls that failed (retried)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._finishing = threading.Event()
        self._recycle = threading.Event()
        self._hold: Hold | None = None
        self._thread: threading.Thread | None = None
        self._env: dict[str, str | None] = {}

    def summary(self) -> str:
        per = self.records / self.invocations if self.invocations else 0.0
        return (
            f"{self.invocations} invocations, {self.records} records ({per:.0f} per batch), "
            f"{self.batch_failures} batch failures retried, {self.function_errors} function "
            f"errors retried, {self.cold_starts} cold starts, {self.read_errors} GetRecords "
            "errors"
        )

    # --- control --------------------------------------------------------------------------
    def start(self) -> None:
        env = {
            "VIEWKEEPER_CONFIG": str(self.config),
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        }
        for name, value in env.items():
            self._env.setdefault(name, os.environ.get(name))
            os.environ[name] = value
        lambda_handler._RUNTIME = None  # a cold start, on this config
        self._thread = threading.Thread(target=self._run, name="chaos-lambda", daemon=True)
        self._thread.start()
        self.note("lambda applier started")

    def recycle(self) -> None:
        """Lambda recycles the container: the next invocation is a cold start."""
        self._recycle.set()

    def hold_next(self) -> Hold:
        """Stop before the next invocation (its batch read, the handler not yet called)."""
        self._hold = Hold()
        return self._hold

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def finish(self, timeout: float = 120.0) -> None:
        """Read the stream to its end (the writer has stopped), then stop."""
        self._finishing.set()
        if self._thread is not None:
            self._thread.join(timeout)
            caught_up = not self._thread.is_alive()
        else:
            caught_up = True
        self.stop()
        assert caught_up, f"the lambda applier did not read the stream to its end in {timeout}s"
        assert not self.errors, self.errors[:3]
        self.note(f"lambda applier finished: {self.summary()}")

    def stop(self) -> None:
        self._stop.set()
        if self._hold is not None:
            self._hold.release.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        lambda_handler._RUNTIME = None
        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._env = {}

    # --- the poller -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._poll()
        except Exception as exc:  # the applier itself broke: the test fails in finish()
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.note(f"lambda applier CRASHED: {type(exc).__name__}: {exc}")

    def _poll(self) -> None:
        db = boto3_client("dynamodb", self.dynamodb_url)
        streams = boto3_client("dynamodbstreams", self.dynamodb_url)
        arn = db.describe_table(TableName=self.table)["Table"]["LatestStreamArn"]
        shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][0]
        shard_id = shard["ShardId"]

        def iterator(at: str | None) -> str:
            kwargs: dict[str, Any] = {"StreamArn": arn, "ShardId": shard_id}
            if at is None:
                kwargs["ShardIteratorType"] = "TRIM_HORIZON"
            else:
                kwargs.update(ShardIteratorType="AT_SEQUENCE_NUMBER", SequenceNumber=at)
            it: str = streams.get_shard_iterator(**kwargs)["ShardIterator"]
            return it

        it = iterator(None)
        while not self._stop.is_set():
            try:
                page = streams.get_records(ShardIterator=it, Limit=self.rng.randint(1, 100))
            except (BotoCoreError, ClientError) as exc:
                self.read_errors += 1
                self.note(f"lambda GetRecords failed ({type(exc).__name__}); retrying")
                self._stop.wait(0.5)
                continue
            records = page["Records"]
            if not records:
                if self._finishing.is_set():
                    return  # at the end of the stream, and nothing more is written
                it = page["NextShardIterator"]
                self._stop.wait(0.1)
                continue
            if self._hold is not None:
                hold, self._hold = self._hold, None
                hold.reached.set()
                hold.release.wait()
                if self._stop.is_set():
                    return
            failed_at = self._invoke([wire_record(r, arn) for r in records])
            if failed_at is None:
                it = page["NextShardIterator"]
            else:
                self._stop.wait(self.rng.uniform(0.2, 0.6))  # the mapping's retry delay
                it = iterator(failed_at)

    def _invoke(self, records: list[dict[str, Any]]) -> str | None:
        """One invocation; the sequence number to read again from, or None when all done."""
        if self._recycle.is_set() or lambda_handler._RUNTIME is None:
            self._recycle.clear()
            lambda_handler._RUNTIME = None
            self.cold_starts += 1
        self.invocations += 1
        first = str(records[0]["dynamodb"]["SequenceNumber"])
        try:
            result = lambda_handler.handler({"Records": records}, None)
        except Exception as exc:  # a function error: Lambda retries the batch, maybe elsewhere
            self.function_errors += 1
            self.note(f"lambda function error ({type(exc).__name__}: {str(exc)[:200]}); retried")
            lambda_handler._RUNTIME = None
            return first
        failures = result.get("batchItemFailures") or []
        if not failures:
            self.records += len(records)
            return None
        at = str(failures[0].get("itemIdentifier"))
        seqs = [str(r["dynamodb"]["SequenceNumber"]) for r in records]
        if at not in seqs:  # Lambda takes an unknown identifier as the whole batch failing
            at = first
        done = seqs.index(at)
        self.records += done
        self.batch_failures += 1
        self.note(f"lambda batch failed at record {done + 1} of {len(records)}; retried from it")
        return at
