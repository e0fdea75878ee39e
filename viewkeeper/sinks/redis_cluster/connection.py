"""The connection: the cluster client, the sink's state, and the one way calls are sent.

Owns ``__init__``, the key names (README.md, "Key layout"), :meth:`_Connection._run`: many
calls of ``cluster_slot.lua``, each in one slot, sent at once (one pipeline per master, the
masters at once, each pipeline ending in a wait for its replicas), the ones that failed for the
cluster's state (a failover, a migrating slot: MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a lost
connection, a replica not reached) sent again where the cluster now says until
``retry_seconds``, and the script loaded again where a node does not have it (a promoted
replica, a new node); the view ids (``vk:views``) and the bucket
count (``vk:meta``), as the standalone sink keeps them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.cluster import PRIMARY, ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from viewkeeper.projection.api import View
from viewkeeper.sinks.base import SinkError, SinkUnavailable
from viewkeeper.sinks.redis.connection import _is_transient, with_includes, with_retry
from viewkeeper.sinks.redis.packing import _b, _text, tag_for_slot
from viewkeeper.sinks.redis_cluster.replicas import (
    _MoreReplicas,
    _NotReplicated,
    _refused,
    _replicas_listed,
)

log = logging.getLogger("viewkeeper.sinks.redis_cluster")
T = TypeVar("T")
SLOTS = 16384


# The cluster's state, not the call's: redirections, a slot not covered during a failover, a
# lost connection, a replica not reached. Sent again until retry_seconds.
_CLUSTER_STATE = (
    _NotReplicated,
    ClusterError,
    ClusterDownError,
    MovedError,
    AskError,
    TryAgainError,
    SlotNotCoveredError,
    redis.ConnectionError,
    redis.TimeoutError,
)

Call = tuple[list[bytes], list[bytes]]  # one script call: its keys (one slot), its arguments


def _load(name: str) -> bytes:
    return resources.files("viewkeeper.sinks.redis_cluster").joinpath(name).read_bytes()


def _load_views_script() -> bytes:
    return resources.files("viewkeeper.sinks.redis").joinpath("redis_views.lua").read_bytes()


class _Connection:
    """The sink's state and its calls' plumbing; the layers above it add the rest."""

    def __init__(
        self,
        name: str,
        client: RedisCluster | None = None,
        *,
        url: str | None = None,
        key_prefix: str = "vk:",
        entry_prefix: str = "",
        owner_buckets: int = 1024,
        tombstone_retention: float = 48 * 3600,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 5.0,
        batch_size: int = 500,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError(f"redis sink {name!r}: give a client or a url")
            client = RedisCluster.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
            self._owns_client = True
        else:
            self._owns_client = False
        kw = client.nodes_manager.connection_kwargs
        if kw.get("decode_responses"):
            raise ValueError(
                f"redis sink {name!r}: the client must use decode_responses=False; "
                "owner records are binary"
            )
        if not 1 <= owner_buckets <= SLOTS or not key_prefix or "{" in key_prefix:
            raise ValueError(
                f"redis sink {name!r}: owner_buckets must be 1 to {SLOTS} on a cluster and "
                f"key_prefix non-empty without braces (got {owner_buckets}, {key_prefix!r})"
            )
        self.name = name
        first = client.nodes_manager.startup_nodes
        self.where = (
            "cluster " + ",".join(sorted(first)[:3]) if first else "cluster <no startup node>"
        )
        self.key_prefix = key_prefix
        self.entry_prefix = entry_prefix
        self._entry_prefix = _b(entry_prefix)
        self.owner_buckets = owner_buckets
        self.tombstone_retention = tombstone_retention
        self.retry_seconds = retry_seconds
        self.batch_size = batch_size
        self._client: Any = client  # bytes replies; redis-py's annotations assume str
        self._clock = clock
        self._secret = str(kw.get("password") or "")
        self._prefix = _b(key_prefix)
        self._src = with_includes("cluster_slot.lua", _load("cluster_slot.lua"))
        self._sha = hashlib.sha1(self._src).hexdigest().encode()
        self._views_script = client.register_script(_load_views_script())
        self._registry = self._prefix + b"views"
        self._view_ids: dict[str, bytes] = {}
        self._view_names: dict[bytes, str] = {}
        self._markers: dict[str, bytes] = {}  # view -> the marker every slot must hold
        # (view, slot) -> the highest write counter seen there under that marker
        self._seen: dict[tuple[str, int], int] = {}
        self._seen_lock = threading.Lock()
        self._ready = False
        # per thread (each shard worker applies its own batches): the write counters seen in
        # this batch, remembered only once it is acknowledged (a batch held and sent again
        # after a failover must not look like a rollback)
        self._local = threading.local()
        self._no_wait = False
        self._wait_ms = max(1, int(min(retry_seconds, 2.0) * 1000))
        self._executor: ThreadPoolExecutor | None = None
        # each master's replicas as it listed them itself at its last pipeline (CLUSTER NODES)
        self._replicas_of: dict[str, int] = {}
        self._no_probe = False  # CLUSTER NODES refused: the client's slot table alone

    @property
    def _pending_seen(self) -> dict[tuple[str, int, bytes | None], int]:
        """(view, slot, the view's marker then) -> the highest write counter this thread's
        batch saw there."""
        pending: dict[tuple[str, int, bytes | None], int] | None = getattr(
            self._local, "seen", None
        )
        if pending is None:
            pending = self._local.seen = {}
        return pending

    # -- keys (README.md, "Key layout") ------------------------------------------------------
    def _tagged(self, slot: int) -> bytes:
        return self._prefix + b"{" + tag_for_slot(slot) + b"}:"

    def _claims_key(self, slot: int) -> bytes:
        """The slot's bookkeeping: entry claims and each view's marker and write counter."""
        return self._tagged(slot) + b"c"

    def _bucket_slot(self, bucket: int) -> int:
        return bucket * SLOTS // self.owner_buckets  # buckets spread evenly over the slots

    def _bucket(self, item: bytes) -> int:
        return zlib.crc32(item) % self.owner_buckets

    def _owner_keys(self, view: View | str, bucket: int) -> tuple[bytes, bytes, bytes]:
        """(claims, owner records, pending lists) of a bucket of the view: one slot."""
        vid = self._view_id(view if isinstance(view, str) else view.name)
        head = self._tagged(self._bucket_slot(bucket))
        return head + b"c", head + b"o:" + vid, head + b"p:" + vid

    def _claim_key(self, view: View | str) -> bytes:
        name = view if isinstance(view, str) else view.name
        return self._prefix + b"{" + _b(name).replace(b"}", b"") + b"}:ns"

    @staticmethod
    def _slot(key: bytes) -> int:
        return int(key_slot(key))

    # -- calls -------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _with_retry(self, fn: Callable[[], T]) -> T:
        return with_retry(
            fn, self.retry_seconds, f"redis sink {self.name!r} at {self.where}", self._scrub
        )

    def _run(self, calls: Sequence[Call], script: tuple[bytes, bytes] | None = None) -> list[Any]:
        """Run every call of ``cluster_slot.lua`` (each one slot), all at once; the replies, in
        order (``script``: another script than ``cluster_slot.lua``, as (source, sha)). The
        calls go to their masters in one pipeline per master, the masters at once, each
        pipeline ending in a replica wait (:meth:`_send_node`): a reply is returned only once
        every replica of its master has what it wrote. A call that failed for the cluster's
        state (MOVED, ASK, TRYAGAIN, CLUSTERDOWN, a lost connection, a replica not reached) is
        sent again, where the cluster now says (every step is idempotent: README.md, "The
        protocol"), until ``retry_seconds``, then SinkUnavailable; a call that failed for
        itself (a key of viewkeeper's overwritten outside) answers its error, which its caller
        turns into its changes' errors."""
        src, sha = script or (self._src, self._sha)
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        asks: dict[int, tuple[str, int]] = {}  # call -> the node an ASK sent it to
        deadline = time.monotonic() + self.retry_seconds
        wait = 0.02
        loads = 0
        last: BaseException | None = None
        while todo:
            load = refresh = pause = False
            results = self._send_calls(
                sha, [calls[i] for i in todo], [asks.pop(i, None) for i in todo]
            )
            again = []
            for i, res in zip(todo, results, strict=True):
                if isinstance(res, NoScriptError):
                    load = True
                elif isinstance(res, MovedError):
                    self._client.nodes_manager.move_slot(res)  # sent again at once
                elif isinstance(res, AskError):
                    asks[i] = (res.host, res.port)  # sent again at once, after ASKING
                elif isinstance(res, _MoreReplicas):
                    pass  # sent again at once, waiting for them all
                elif isinstance(res, BaseException):
                    if not _is_transient(res) and not isinstance(res, _CLUSTER_STATE):
                        replies[i] = res  # the call's own failure: its caller decides
                        continue
                    last, pause = res, True
                    refresh |= not isinstance(res, TryAgainError)
                else:
                    replies[i] = res
                    continue
                again.append(i)
            todo = again
            if load:  # on every master the client knows (a promoted replica, a new node)
                self._with_retry(lambda: self._client.script_load(src))
                loads += 1
                if loads > 1:  # missing again: a node the client does not know as a master
                    pause = refresh = True
                    last = NoScriptError("the script is missing on a node after loading it")
            if not pause:
                continue
            if time.monotonic() > deadline:
                raise SinkUnavailable(
                    f"redis sink {self.name!r} at {self.where} is unavailable after "
                    f"retrying for {self.retry_seconds:g}s: {type(last).__name__}: "
                    f"{self._scrub(str(last))}"
                )
            time.sleep(wait)
            wait = min(wait * 2, 0.5)
            if refresh:  # a node gone or the cluster down: ask the cluster where slots are
                try:
                    self._client.nodes_manager.initialize()
                except Exception as exc:
                    log.debug("redis sink %s: topology refresh failed: %s", self.name, exc)
        return replies

    def _send_calls(
        self, sha: bytes, calls: list[Call], asks: list[tuple[str, int] | None]
    ) -> list[Any]:
        """Send ``calls`` once, each to its slot's master (or the node an ASK named), one
        pipeline per node, the nodes at once; the replies, or the exception each call met."""
        nodes = self._client.nodes_manager
        out: list[Any] = [None] * len(calls)
        groups: dict[tuple[str, bool], tuple[Any, list[int]]] = {}
        with self._seen_lock:  # each master's replicas: as it listed them last, else as the
            known = dict(self._replicas_of)  # client's slot table lists them (below)
        replicas: dict[str, int] = {}
        for j, (keys, _args) in enumerate(calls):
            ask = asks[j]
            try:
                if ask is None:
                    slot = self._slot(keys[0])
                    node = nodes.get_node_from_slot(slot)
                    listed = len(nodes.slots_cache.get(slot) or ()) - 1
                    replicas[node.name] = max(replicas.get(node.name, 0), listed)
                else:  # an importing node: as it listed them, or none until it says
                    node = nodes.get_node(*ask) or self._new_node(*ask)
            except SlotNotCoveredError as exc:
                out[j] = exc
                continue
            groups.setdefault((node.name, ask is not None), (node, []))[1].append(j)
        jobs = [
            (node, asking, known.get(node.name, replicas.get(node.name, 0)), members)
            for (_name, asking), (node, members) in groups.items()
        ]

        def send(job: tuple[Any, bool, int, list[int]]) -> list[Any]:
            return self._send_node(sha, calls, *job)

        try:
            done = list(self._pool().map(send, jobs)) if len(jobs) > 1 else [send(jobs[0])]
        except RuntimeError:  # the pool shut down by close() meanwhile: one node at a time
            done = [send(job) for job in jobs]
        for (_node, _asking, _wait, members), replies in zip(jobs, done, strict=True):
            for j, reply in zip(members, replies, strict=True):
                out[j] = reply
        return out

    def _send_node(
        self,
        sha: bytes,
        calls: list[Call],
        node: Any,
        asking: bool,
        replicas: int,
        members: list[int],
    ) -> list[Any]:
        """One node's calls in one pipeline on one connection, then ``WAIT <replicas>`` where
        the node has replicas, then ``CLUSTER NODES`` and ``INFO replication``.

        WAIT: every replica of the node has the connection's writes, or the calls answer
        _NotReplicated and are sent again. A batch is thus acknowledged (and checkpointed)
        only once every replica that a failover could promote has its writes (Redis
        replicates asynchronously; one replica is not enough: it may be one that is never
        promoted), and apply's step F runs only after step E's entries are safe. WAIT waits
        for the connection's last write: every script sent here writes at each call
        (cluster_slot.lua counts the call in its slot's write counters, or in '#w' if it
        checks no view; the change-log group in the view's claim, which the daemon always
        checks; the claim script sets its fields), so that is this pipeline's, even for a
        call that changed nothing else (a replay after another connection's writes: the
        counter's write comes after them).

        CLUSTER NODES and INFO: the replicas the node itself lists or has attached
        (_replicas_listed), remembered for its next pipeline. The client's slot table is
        refreshed only on a redirection or an error, so it can miss a replica that joined
        since (a failed master back as a replica), even one cut off since; more replicas
        than waited for make the calls be sent again at once, waiting for them all."""
        wait = replicas > 0 and not self._no_wait
        probe = not self._no_probe
        pipe = self._client.get_redis_connection(node).pipeline(transaction=False)
        for j in members:
            keys, args = calls[j]
            if asking:
                pipe.execute_command("ASKING")
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        if wait:
            pipe.execute_command("WAIT", replicas, self._wait_ms)
        if probe:
            pipe.execute_command("CLUSTER NODES")
            pipe.execute_command("INFO", "replication")
        try:
            raw: list[Any] = pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection: the node down, a timeout
            return [exc] * len(members)
        step = 2 if asking else 1  # each call's reply after its ASKING's
        replies, tail = raw[step - 1 : step * len(members) : step], raw[step * len(members) :]
        problem: Exception | None = None
        if wait:
            acked = tail.pop(0)
            if isinstance(acked, redis.ResponseError) and _refused(acked):
                self._refuse_wait(acked)  # WAIT refused (some managed services)
            elif not isinstance(acked, int) or acked < replicas:
                # a number short (a replica cut off or lagging), or an error: UNBLOCKED when a
                # failover made the node a replica, or WAIT sent to a replica (a stale table)
                problem = _NotReplicated(
                    f"master {node.name}: {acked!r} of its {replicas} replica(s) had these "
                    f"writes after {self._wait_ms} ms (a failover or a lagging replica)"
                )
        if probe:
            listed, info = tail
            count = _replicas_listed(listed, info)
            if count is not None:
                with self._seen_lock:
                    self._replicas_of[node.name] = count
                if count > replicas and not self._no_wait and problem is None:
                    problem = _MoreReplicas(
                        f"master {node.name} lists {count} replica(s), not {replicas}"
                    )
            elif isinstance(listed, redis.ResponseError) and not _is_transient(listed):
                self._refuse_probe(listed)
        if problem is not None:
            replies = [problem if not isinstance(r, BaseException) else r for r in replies]
        return replies

    def _refuse_probe(self, exc: BaseException) -> None:
        if not self._no_probe:
            self._no_probe = True
            log.warning(
                "redis sink %s (%s): CLUSTER NODES refused (%s): a master's replicas are "
                "those the client's slot table lists",
                self.name,
                self.where,
                exc,
            )

    def _refuse_wait(self, exc: BaseException) -> None:
        if not self._no_wait:
            self._no_wait = True
            log.warning(
                "redis sink %s (%s): WAIT refused (%s): batches are acknowledged without "
                "waiting for a replica",
                self.name,
                self.where,
                exc,
            )

    def _new_node(self, host: str, port: int) -> Any:
        """A node the client did not know (an ASK to a node added since): known from now."""
        node = ClusterNode(host, port, PRIMARY)  # type: ignore[no-untyped-call]
        with self._client.nodes_manager._lock:
            self._client.nodes_manager.nodes_cache.setdefault(node.name, node)
            return self._client.nodes_manager.nodes_cache[node.name]

    def _pool(self) -> ThreadPoolExecutor:
        with self._seen_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(8, thread_name_prefix="vk-cluster")
            return self._executor

    def _commit_seen(self) -> None:
        """The batch is safe (every call waited for its replicas): the write counters its calls
        saw become the marks a later call's must not go below (README.md, "Claims")."""
        seen, self._local.seen = self._pending_seen, {}
        with self._seen_lock:
            for (view, slot, marker), n in seen.items():
                if marker != self._markers.get(view):
                    continue  # the view was re-armed meanwhile: its counters started again
                if n > self._seen.get((view, slot), 0):
                    self._seen[(view, slot)] = n

    # -- view ids and the bucket count ------------------------------------------------------
    def _view_id(self, name: str) -> bytes:
        vid = self._view_ids.get(name)
        if vid is None:
            vid = bytes(
                self._with_retry(lambda: self._views_script(keys=[self._registry], args=[name]))
            )
            self._view_ids[name], self._view_names[vid] = vid, name
        return vid

    def _view_name(self, vid: bytes) -> str:
        if vid not in self._view_names:
            raw = self._with_retry(lambda: self._client.hget(self._registry, b"#" + vid))
            self._view_names[vid] = _text(raw) if raw else f"#{_text(vid)}"
        return self._view_names[vid]

    def _ensure_ready(self) -> None:
        if self._ready:
            return
        self._refuse_standalone()
        meta = self._prefix + b"meta"

        def check() -> Any:
            self._client.script_load(self._src)
            self._client.hsetnx(meta, "owner_buckets", self.owner_buckets)
            return self._client.hget(meta, "owner_buckets")

        stored = self._with_retry(check)
        if int(stored) != self.owner_buckets:
            raise SinkError(
                f"redis sink {self.name!r} ({self.where}): owner_buckets is {self.owner_buckets} "
                f"but the data under {self.key_prefix!r} was written with {int(stored)}; set "
                f"owner_buckets: {int(stored)} (changing it needs an empty prefix and a rebuild)"
            )
        self._ready = True

    def _refuse_standalone(self) -> None:
        """SinkError when the server is not in cluster mode (``cluster: true`` set on a
        standalone Redis)."""

        def info() -> Any:
            node = self._client.get_default_node()
            return self._client.info("cluster", target_nodes=node)

        try:
            enabled = self._with_retry(info).get("cluster_enabled")
        except redis.ResponseError:
            return  # INFO refused (an ACL): the cluster client's own discovery decides
        if not enabled:
            raise SinkError(
                f"redis sink {self.name!r} ({self.where}) is not a Redis Cluster "
                "(cluster_enabled:0): remove `cluster: true` from this connection"
            )

    def masters(self) -> list[Any]:
        """The cluster's primaries, as the client knows them now."""
        return list(self._client.get_primaries())

    def _unexpected(self, reply: Any) -> SinkError:
        return SinkError(
            f"redis sink {self.name!r} ({self.where}): the cluster script answered "
            f"{self._scrub(repr(reply))[:200]}, which this client does not know; nothing is "
            "reported applied"
        )
