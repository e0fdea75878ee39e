"""The coordination table in DynamoDB: one table, key ``pk`` (hash) + ``sk`` (range).

Layout (stable; ``viewkeeper status`` and operators read it)::

    pk = "lease#<table>"  sk = <shard id>   owner, counter, checkpoint, parents, state, lag, ...
    pk = "worker"         sk = <worker id>  heartbeat_at, acked {view: generation}, host, pid
    pk = "generation"     sk = <view>       gen
    pk = "deadletter"     sk = <id>         view, table, item_key, sequence, error, record (zlib)
    pk = "meta"           sk = "deployment" id (random, written once: the table's identity)
    pk = "view"           sk = <view>       marker, needs_rebuild, reason, since

Every lease transition is a conditional write (on ``owner`` and ``counter``), as in KCL, so
two workers never both believe they took the same lease. A take also writes a new ``token``;
checkpoints are conditional on ``owner`` and ``token`` (so a worker thread of an earlier
take by the same process cannot write), and on ``cp_pad`` — the checkpoint zero-padded to
40 digits, so that text order is integer order — not being above the new one: a checkpoint
never moves backwards except through :meth:`DynamoDBStore.reset_lease`.

Over 500 lines: one class implements the whole ``CoordinationStore`` protocol
(coordination/model.py) on one table; its parts (leases, workers, generations, views, dead
letters) share the table's key layout above and its conditional-write and retry helpers
(``_update``, ``_query``), and a reader checking one condition wants the others beside it.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Mapping
from typing import Any

import orjson
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from viewkeeper.coordination.model import (
    CoordinationUnavailable,
    DeadLetter,
    Lease,
    LeaseLost,
    LeaseState,
    ViewState,
    WorkerInfo,
    merge_generations,
)
from viewkeeper.projection.versions import padded_sequence

__all__ = ["CoordinationTableError", "DynamoDBStore"]

_KEY_SCHEMA = [
    {"AttributeName": "pk", "KeyType": "HASH"},
    {"AttributeName": "sk", "KeyType": "RANGE"},
]


class CoordinationTableError(Exception):
    """The coordination table is missing (and may not be created) or has the wrong schema.

    The message is one line naming the table and the fix. ``configuration`` is True when the
    fix is in the config or the table itself (wrong schema, missing while creation is off):
    the CLI exits 78 then, so systemd does not restart into the same mistake.
    """

    def __init__(self, message: str, *, configuration: bool = True) -> None:
        super().__init__(message)
        self.configuration = configuration


def _s(v: str) -> dict[str, Any]:
    return {"S": v}


def _n(v: float | int) -> dict[str, Any]:
    return {"N": repr(v) if isinstance(v, float) else str(v)}


def _gens(gens: Mapping[str, int]) -> dict[str, Any]:
    return {"M": {view: _n(gen) for view, gen in gens.items()}}


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


_TRANSIENT_CODES = frozenset({
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "ThrottlingException",
    "InternalServerError",
    "ServiceUnavailable",
})  # fmt: skip


def _transient(exc: BaseException) -> bool:
    """A failure worth trying again later: no connection (refused, reset, timed out) or a
    throttling / 5xx answer — what is left after botocore's own retries."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error.get("Code") in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, BotoConnectionError | HTTPClientError)


class DynamoDBStore:
    def __init__(self, client: Any, table: str, *, create_if_missing: bool = True) -> None:
        self._db = client
        self.table = table
        self._create = create_if_missing
        self._deployment: str | None = None

    # --- table -------------------------------------------------------------------------
    def ensure(self) -> None:
        """Check the table; create it when it is missing and creation is allowed."""
        desc = self._describe()
        if desc is None:
            if not self._create:
                raise CoordinationTableError(self._missing()) from None
            try:
                self._db.create_table(
                    TableName=self.table,
                    KeySchema=_KEY_SCHEMA,
                    BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[
                        {"AttributeName": "pk", "AttributeType": "S"},
                        {"AttributeName": "sk", "AttributeType": "S"},
                    ],
                )
            except ClientError as exc:
                # several processes started together: one creates it, the others wait for it
                if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                    raise
            self._db.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
            desc = self._describe()
            if desc is None:
                raise CoordinationTableError(self._missing(), configuration=False)
        self._check_schema(desc)

    def check(self) -> None:
        """Check the table without creating it (``status``, ``deadletters``): raise
        CoordinationTableError naming the table and the fix when it is missing or has the
        wrong key schema. Connection and credential failures raise botocore's errors."""
        desc = self._describe()
        if desc is None:
            if not self._create:
                raise CoordinationTableError(self._missing())
            raise CoordinationTableError(
                f"coordination table {self.table!r} does not exist; run `viewkeeper run` or "
                "`viewkeeper check` once with this config to create it (create_if_missing "
                "is on), or create it with keys pk (S, HASH) and sk (S, RANGE); check "
                "coordination.table and aws.region if it should exist",
                configuration=False,
            )
        self._check_schema(desc)

    def _describe(self) -> dict[str, Any] | None:
        """The table's description, or None when it does not exist."""
        try:
            return dict(self._db.describe_table(TableName=self.table)["Table"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            return None

    def _missing(self) -> str:
        return (
            f"coordination table {self.table!r} does not exist and "
            "coordination.create_if_missing is false; create it (keys pk S hash, sk S range) "
            "or set coordination.create_if_missing: true"
        )

    def _check_schema(self, desc: dict[str, Any]) -> None:
        schema = sorted((k["AttributeName"], k["KeyType"]) for k in desc.get("KeySchema", []))
        types = {
            a["AttributeName"]: a["AttributeType"] for a in desc.get("AttributeDefinitions", [])
        }
        if schema != [("pk", "HASH"), ("sk", "RANGE")] or any(
            types.get(k, "S") != "S" for k in ("pk", "sk")
        ):
            shown = ", ".join(f"{name} ({types.get(name, '?')}, {kind})" for name, kind in schema)
            raise CoordinationTableError(
                f"coordination table {self.table!r} has key schema {shown or 'none'}, "
                "expected pk (S, HASH) and sk (S, RANGE); it is not a viewkeeper coordination "
                "table: point coordination.table at a table of its own (viewkeeper creates "
                "it when coordination.create_if_missing is true)"
            )

    def _query(self, pk: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": _s(pk)},
            "ConsistentRead": True,
        }
        while True:
            page = self._db.query(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _update(
        self,
        pk: str,
        sk: str,
        expr: str,
        values: dict[str, Any],
        cond: str | None = None,
        names: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "Key": {"pk": _s(pk), "sk": _s(sk)},
            "UpdateExpression": expr,
            "ReturnValues": "ALL_NEW",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        if cond:
            kwargs["ConditionExpression"] = cond
        if names:
            kwargs["ExpressionAttributeNames"] = names
        return dict(self._db.update_item(**kwargs)["Attributes"])

    # --- leases ----------------------------------------------------------------------------
    @staticmethod
    def _lease(item: dict[str, Any]) -> Lease:
        def opt(name: str) -> str | None:
            v = item.get(name)
            return v["S"] if v and "S" in v else None

        lag = item.get("lag", {}).get("N")
        cp_at = item.get("checkpoint_at", {}).get("N")
        return Lease(
            table=item["pk"]["S"].partition("#")[2],
            shard_id=item["sk"]["S"],
            stream_arn=item["stream_arn"]["S"],
            parents=tuple(p["S"] for p in item.get("parents", {}).get("L", [])),
            owner=opt("owner"),
            counter=int(item.get("counter", {"N": "0"})["N"]),
            checkpoint=opt("checkpoint"),
            state=LeaseState(item.get("state", {"S": "active"})["S"]),
            lag=float(lag) if lag is not None else None,
            caught_up=bool(item.get("caught_up", {}).get("BOOL", False)),
            updated_at=float(item.get("updated_at", {"N": "0"})["N"]),
            error=opt("error"),
            token=opt("token"),
            checkpoint_at=float(cp_at) if cp_at is not None else None,
            gens={k: int(v["N"]) for k, v in item.get("gens", {}).get("M", {}).items()},
        )

    def list_leases(self, table: str) -> list[Lease]:
        return [self._lease(i) for i in self._query(f"lease#{table}")]

    def create_lease(self, lease: Lease) -> bool:
        item = {
            "pk": _s(f"lease#{lease.table}"),
            "sk": _s(lease.shard_id),
            "stream_arn": _s(lease.stream_arn),
            "parents": {"L": [_s(p) for p in lease.parents]},
            "counter": _n(0),
            "state": _s(lease.state.value),
            "updated_at": _n(time.time()),
        }
        if lease.checkpoint is not None:
            item["checkpoint"] = _s(lease.checkpoint)
        if lease.checkpoint_at is not None:
            item["checkpoint_at"] = _n(lease.checkpoint_at)
        try:
            self._db.put_item(
                TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(pk)"
            )
            return True
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise

    def _owner_cond(self, lease: Lease, values: dict[str, Any]) -> str:
        if lease.owner is None:
            return "attribute_not_exists(#o)"
        values[":me"] = _s(lease.owner)
        return "#o = :me"

    def take_lease(
        self, lease: Lease, owner: str, gens: Mapping[str, int] | None = None
    ) -> Lease | None:
        values: dict[str, Any] = {
            ":new": _s(owner),
            ":c": _n(lease.counter),
            ":one": _n(1),
            ":t": _n(time.time()),
            ":tk": _s(uuid.uuid4().hex[:16]),
            ":g": _gens(merge_generations(lease.gens, gens or {})),
        }
        # the condition on the counter makes lease.gens the stored gens: merging them here
        # never loses a generation another writer published
        cond = f"#c = :c AND {self._owner_cond(lease, values)}"
        try:
            item = self._update(
                f"lease#{lease.table}",
                lease.shard_id,
                "SET #o = :new, updated_at = :t, #tk = :tk, gens = :g ADD #c :one",
                values,
                cond,
                {"#o": "owner", "#c": "counter", "#tk": "token"},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise
        return self._lease(item)

    def renew_lease(
        self,
        lease: Lease,
        lag: float | None,
        caught_up: bool,
        *,
        tip_at: float | None = None,
        gens: Mapping[str, int] | None = None,
    ) -> Lease | None:
        values: dict[str, Any] = {
            ":c": _n(lease.counter),
            ":one": _n(1),
            ":t": _n(time.time()),
            ":lag": _n(lag) if lag is not None else {"NULL": True},
            ":cu": {"BOOL": caught_up},
            ":g": _gens(merge_generations(lease.gens, gens or {})),
        }
        cond = f"#c = :c AND {self._owner_cond(lease, values)}"
        # the reader saw the end of the shard at tip_at: it is at its checkpoint since then
        at = ""
        if tip_at is not None:
            at = ", checkpoint_at = :tip"
            values[":tip"] = _n(tip_at)
        try:
            item = self._update(
                f"lease#{lease.table}",
                lease.shard_id,
                f"SET updated_at = :t, #lag = :lag, caught_up = :cu, gens = :g{at} ADD #c :one",
                values,
                cond,
                {"#o": "owner", "#c": "counter", "#lag": "lag"},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return None
            raise
        return self._lease(item)

    def checkpoint(
        self,
        lease: Lease,
        sequence: str | None,
        state: LeaseState | None = None,
        error: str | None = None,
    ) -> None:
        if lease.owner is None:
            raise LeaseLost(f"lease on {lease.table}/{lease.shard_id} has no owner")
        now = time.time()
        values: dict[str, Any] = {":t": _n(now)}
        names = {"#o": "owner", "#e": "error", "#tk": "token"}
        sets = ["updated_at = :t"]
        removes = []
        cond = self._owner_cond(lease, values)
        if lease.token is None:  # taken by a viewkeeper that wrote no token
            cond += " AND attribute_not_exists(#tk)"
        else:
            cond += " AND #tk = :tk"
            values[":tk"] = _s(lease.token)
        if sequence is not None:
            sets += ["checkpoint = :seq", "checkpoint_at = :t"]
            values[":seq"] = _s(sequence)
            pad = padded_sequence(sequence)
            if pad is not None:
                sets.append("cp_pad = :pad")
                values[":pad"] = _s(pad)
                cond += " AND (attribute_not_exists(cp_pad) OR cp_pad <= :pad)"
            else:
                removes.append("cp_pad")
        if state is not None:
            sets.append("#st = :st")
            values[":st"] = _s(state.value)
            names["#st"] = "state"
        if error is not None:
            sets.append("#e = :e")
            values[":e"] = _s(error[:2000])
        else:
            removes.append("#e")
        expr = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        try:
            self._update(f"lease#{lease.table}", lease.shard_id, expr, values, cond, names)
        except ClientError as exc:
            if _conditional_failed(exc):
                raise LeaseLost(self._why_refused(lease, sequence)) from None
            if _transient(exc):
                raise CoordinationUnavailable(f"coordination table {self.table}: {exc}") from None
            raise
        except BotoCoreError as exc:
            if _transient(exc):
                raise CoordinationUnavailable(f"coordination table {self.table}: {exc}") from None
            raise

    def _why_refused(self, lease: Lease, sequence: str | None) -> str:
        """Why a checkpoint write was refused, read back (only on that rare path)."""
        where = f"lease on {lease.table}/{lease.shard_id}"
        try:
            now = next(
                (x for x in self.list_leases(lease.table) if x.shard_id == lease.shard_id), None
            )
        except (ClientError, BotoCoreError):
            return f"{where} is no longer held by {lease.owner}"
        if now is None:
            return f"{where} no longer exists"
        if now.owner != lease.owner:
            return f"{where} is no longer held by {lease.owner} (held by {now.owner})"
        if now.token != lease.token:
            return f"{where} was taken again by {lease.owner} since this worker started"
        return (
            f"checkpoint of {lease.table}/{lease.shard_id} would move backwards from "
            f"{now.checkpoint} to {sequence}"
        )

    def release_lease(self, lease: Lease) -> None:
        self._free(lease, check_counter=False)

    def revoke_lease(self, lease: Lease, gens: Mapping[str, int] | None = None) -> bool:
        return self._free(lease, check_counter=True, gens=gens)

    def publish_generations(self, lease: Lease, gens: Mapping[str, int]) -> bool:
        values: dict[str, Any] = {
            ":c": _n(lease.counter),
            ":one": _n(1),
            ":g": _gens(merge_generations(lease.gens, gens)),
        }
        try:
            self._update(
                f"lease#{lease.table}",
                lease.shard_id,
                "SET gens = :g ADD #c :one",
                values,
                "#c = :c AND attribute_not_exists(#o)",
                {"#o": "owner", "#c": "counter"},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def _free(
        self, lease: Lease, *, check_counter: bool, gens: Mapping[str, int] | None = None
    ) -> bool:
        """Remove the owner (and raise the counter) if ``lease.owner`` still holds it — and,
        with ``check_counter``, only at the counter seen (then ``gens`` may be merged in);
        False when it changed."""
        values: dict[str, Any] = {":one": _n(1)}
        cond = self._owner_cond(lease, values)
        expr = "REMOVE #o ADD #c :one"
        if check_counter:
            values[":c"] = _n(lease.counter)
            cond = f"#c = :c AND {cond}"
            if gens:
                values[":g"] = _gens(merge_generations(lease.gens, gens))
                expr = "SET gens = :g " + expr
        try:
            self._update(
                f"lease#{lease.table}",
                lease.shard_id,
                expr,
                values,
                cond,
                {"#o": "owner", "#c": "counter"},
            )
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    def reset_lease(
        self, table: str, shard_id: str, checkpoint: str | None, state: LeaseState
    ) -> None:
        values: dict[str, Any] = {":st": _s(state.value), ":one": _n(1), ":t": _n(time.time())}
        expr = "SET #st = :st, checkpoint_at = :t"  # the position is "now" for the next reader
        removes = ["#e"]
        if checkpoint is not None:
            expr += ", checkpoint = :cp"
            values[":cp"] = _s(checkpoint)
            pad = padded_sequence(checkpoint)
            if pad is not None:
                expr += ", cp_pad = :pad"
                values[":pad"] = _s(pad)
            else:
                removes.append("cp_pad")
        else:
            removes += ["checkpoint", "cp_pad"]
        expr += " REMOVE " + ", ".join(removes) + " ADD #c :one"
        self._update(
            f"lease#{table}",
            shard_id,
            expr,
            values,
            "attribute_exists(pk)",
            {"#st": "state", "#e": "error", "#c": "counter"},
        )

    def delete_lease(self, table: str, shard_id: str) -> None:
        self._db.delete_item(
            TableName=self.table, Key={"pk": _s(f"lease#{table}"), "sk": _s(shard_id)}
        )

    # --- workers and generations ----------------------------------------------------------
    def put_worker(self, info: WorkerInfo) -> None:
        self._db.put_item(
            TableName=self.table,
            Item={
                "pk": _s("worker"),
                "sk": _s(info.worker_id),
                "heartbeat_at": _n(info.heartbeat_at),
                "acked": {"M": {k: _n(v) for k, v in info.acked.items()}},
                "host": _s(info.host),
                "pid": _n(info.pid),
                "leases": _n(info.leases),
                "started_at": _n(info.started_at),
            },
        )

    def list_workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(
                worker_id=i["sk"]["S"],
                heartbeat_at=float(i["heartbeat_at"]["N"]),
                acked={k: int(v["N"]) for k, v in i.get("acked", {}).get("M", {}).items()},
                host=i.get("host", {}).get("S", ""),
                pid=int(i.get("pid", {"N": "0"})["N"]),
                leases=int(i.get("leases", {"N": "0"})["N"]),
                started_at=float(i.get("started_at", {"N": "0"})["N"]),
            )
            for i in self._query("worker")
        ]

    def delete_worker(self, worker_id: str) -> None:
        self._db.delete_item(TableName=self.table, Key={"pk": _s("worker"), "sk": _s(worker_id)})

    def generations(self) -> dict[str, int]:
        return {i["sk"]["S"]: int(i["gen"]["N"]) for i in self._query("generation")}

    def raise_generation(self, view: str) -> int:
        item = self._update("generation", view, "ADD gen :one", {":one": _n(1)})
        return int(item["gen"]["N"])

    # --- the deployment and its views -------------------------------------------------------
    def deployment(self) -> str:
        """Made on first use with a conditional put (the first process wins), then cached."""
        if self._deployment is None:
            key = {"pk": _s("meta"), "sk": _s("deployment")}
            try:
                self._db.put_item(
                    TableName=self.table,
                    Item={**key, "id": _s(uuid.uuid4().hex), "created_at": _n(time.time())},
                    ConditionExpression="attribute_not_exists(pk)",
                )
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise
            item = self._db.get_item(TableName=self.table, Key=key, ConsistentRead=True)
            self._deployment = str(item["Item"]["id"]["S"])
        return self._deployment

    def view_states(self) -> dict[str, ViewState]:
        out = {}
        for i in self._query("view"):
            since = i.get("since", {}).get("N")
            out[i["sk"]["S"]] = ViewState(
                view=i["sk"]["S"],
                marker=i.get("marker", {}).get("S"),
                needs_rebuild=bool(i.get("needs_rebuild", {}).get("BOOL", False)),
                reason=i.get("reason", {}).get("S"),
                since=float(since) if since is not None else None,
                losses=int(i.get("losses", {}).get("N", "0")),
            )
        return out

    def set_marker(self, view: str, marker: str) -> None:
        self._update("view", view, "SET marker = :m", {":m": _s(marker)})

    def record_first_marker(self, view: str, marker: str) -> str:
        try:
            self._update(
                "view",
                view,
                "SET marker = :m",
                {":m": _s(marker)},
                "attribute_not_exists(marker) OR marker = :m",
            )
            return marker
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        state = self.view_states().get(view)
        return state.marker if state is not None and state.marker else marker

    def mark_needs_rebuild(self, view: str, reason: str, at: float, marker: str | None) -> None:
        values: dict[str, Any] = {
            ":t": {"BOOL": True},
            ":r": _s(reason[:2000]),
            ":at": _n(at),
            ":one": _n(1),
        }
        sets = "needs_rebuild = :t, reason = if_not_exists(reason, :r), "
        sets += "since = if_not_exists(since, :at)"
        if marker is not None:
            sets = "marker = :m, " + sets
            values[":m"] = _s(marker)
        self._update("view", view, "SET " + sets + " ADD losses :one", values)

    def clear_needs_rebuild(self, view: str, marker: str, losses: int | None = None) -> bool:
        values = {":t": {"BOOL": True}, ":f": {"BOOL": False}, ":m": _s(marker)}
        cond = "needs_rebuild = :t AND marker = :m"
        if losses is not None:
            values[":l"] = _n(losses)
            cond += " AND " + (
                "(attribute_not_exists(losses) OR losses = :l)" if losses == 0 else "losses = :l"
            )
        try:
            self._update("view", view, "SET needs_rebuild = :f REMOVE reason, since", values, cond)
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    # --- dead letters -----------------------------------------------------------------------
    def put_deadletter(self, dl: DeadLetter) -> None:
        """One item per id; a record dead-lettered again keeps its first ``created_at``."""
        values: dict[str, Any] = {
            ":view": _s(dl.view),
            ":table": _s(dl.table),
            ":item": _s(dl.item_key),
            ":seq": _s(dl.sequence),
            ":err": _s(dl.error[:4000]),
            ":tb": _s(dl.traceback[-8000:] or "-"),
            ":t": _n(dl.created_at),
        }
        names = {
            "#v": "view",
            "#tb": "table",
            "#sq": "sequence",
            "#er": "error",
            "#trace": "traceback",
        }
        sets = [
            "#v = :view",
            "#tb = :table",
            "item_key = :item",
            "#sq = :seq",
            "#er = :err",
            "#trace = :tb",
            "created_at = if_not_exists(created_at, :t)",
        ]
        removes = []
        gen_kept = None
        if dl.generation is not None:
            sets.append("generation = :gen")
            values[":gen"] = _n(dl.generation)
            gen_kept = "attribute_not_exists(generation) OR generation <= :gen"
        if dl.record is not None:
            names["#rec"] = "record"
            blob = zlib.compress(orjson.dumps(dl.record, default=str))
            if len(blob) > 350_000:
                sets.append("record_note = :note")
                values[":note"] = _s(
                    f"raw record of {len(blob)} compressed bytes too large "
                    "to keep; replay re-reads the item"
                )
                removes.append("#rec")
            else:
                sets.append("#rec = :rec")
                values[":rec"] = {"B": blob}
        expr = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        try:
            self._update("deadletter", dl.id, expr, values, gen_kept, names)
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            # stored with a higher generation (another reader of the shard): keep that one

    def list_deadletters(self, limit: int = 1000) -> list[DeadLetter]:
        return [self._deadletter(i) for i in self._query("deadletter")[:limit]]

    @staticmethod
    def _deadletter(i: dict[str, Any]) -> DeadLetter:
        """Tolerant of missing attributes (moto may show an item half-updated to a
        concurrent query; an item written by hand or by an older viewkeeper)."""

        def text(name: str) -> str:
            return str(i.get(name, {}).get("S", ""))

        blob = i.get("record", {}).get("B")
        gen = i.get("generation", {}).get("N")
        return DeadLetter(
            id=i["sk"]["S"],
            view=text("view"),
            table=text("table"),
            item_key=text("item_key"),
            sequence=text("sequence") or "0",
            error=text("error"),
            traceback=text("traceback"),
            created_at=float(i.get("created_at", {}).get("N", "0")),
            record=orjson.loads(zlib.decompress(blob)) if blob else None,
            generation=int(gen) if gen is not None else None,
        )

    def get_deadletter(self, dl_id: str) -> DeadLetter | None:
        item = self._db.get_item(
            TableName=self.table,
            Key={"pk": _s("deadletter"), "sk": _s(dl_id)},
            ConsistentRead=True,
        ).get("Item")
        return self._deadletter(item) if item else None

    def delete_deadletter(self, dl_id: str) -> None:
        self._db.delete_item(TableName=self.table, Key={"pk": _s("deadletter"), "sk": _s(dl_id)})
