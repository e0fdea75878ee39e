"""Rebuild from a full table scan while the stream keeps flowing (I6), against moto, the real
Redis and the real OpenSearch."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import redis_view_keys, write_config
from viewkeeper.app import App
from viewkeeper.coordination.model import Lease, WorkerInfo
from viewkeeper.projection.registry import load_views
from viewkeeper.runtime.rebuild import HandshakeTimeout, RebuildSettings, rebuild
from viewkeeper.stream.values import decode_image

TABLE = "rb-items"


@pytest.fixture
def config(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    os_client: Any,
    os_prefix: str,
    dynamodb_url: str,
    redis_url: str,
    opensearch_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    make_table(dynamodb, TABLE, hash_key="pk")
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.rebuild_v1"],
        opensearch={"search": {"hosts": [opensearch_url], "index_prefix": os_prefix}},
    )


def put(db: Any, pk: str, group: str, n: int) -> None:
    db.put_item(TableName=TABLE, Item={"pk": {"S": pk}, "group": {"S": group}, "n": {"N": str(n)}})


def table_items(db: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": TABLE}
    while True:
        page = db.scan(**kwargs)
        items += [decode_image(i) for i in page["Items"]]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def expected_v1(items: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    redis_keys: dict[str, Any] = {}
    docs: dict[str, Any] = {}
    for it in items:
        redis_keys[f"item:{it['pk']}"] = f'{{"group":"{it["group"]}","n":{it["n"]}}}'
        redis_keys.setdefault(f"group:{it['group']}", {})[it["pk"]] = float(it["n"])
        docs[it["pk"]] = {"group": it["group"], "n": it["n"]}
    return redis_keys, docs


def os_docs(app: App) -> dict[str, Any]:
    sink: Any = app.sinks[("opensearch", "search")]
    view = app.registry.get("doc")
    return sink.live_documents(view)  # type: ignore[no-any-return]


def run_rebuild(app: App, names: list[str], **settings: Any) -> Any:
    views = [app.registry.get(n) for n in names]
    return rebuild(
        views,
        app.registry,
        app.client,
        app.store,
        app.pipeline,
        RebuildSettings(**settings),
        out=io.StringIO(),
    )


def test_rebuild_while_a_writer_and_the_daemon_run_converges(
    config: Path, dynamodb: Any, redis_client: Any
) -> None:
    rng = random.Random(7)
    for i in range(40):  # written before the daemon ever looks: only a rebuild finds them
        put(dynamodb, f"k{i}", rng.choice("abc"), rng.randrange(100))
    app = App.from_file(str(config))
    sup = app.supervisor()
    daemon = threading.Thread(target=sup.run, daemon=True)
    daemon.start()
    stop_writer = threading.Event()

    def writer() -> None:
        j = 0
        while not stop_writer.is_set():
            j += 1
            pk = f"k{rng.randrange(50)}"
            if rng.random() < 0.2:
                dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": pk}})
            else:  # updates, moves between groups, re-creates
                put(dynamodb, pk, rng.choice("abc"), rng.randrange(100))
            time.sleep(0.005)

    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.5)
    try:
        report = run_rebuild(app, ["card", "doc"], segments=3, batch_size=7)
    finally:
        time.sleep(0.5)
        stop_writer.set()
        w.join()
    assert report.scanned > 0
    sup.request_stop()
    daemon.join(30)
    App.from_file(str(config)).supervisor().run(until_caught_up=True)

    want_redis, want_docs = expected_v1(table_items(dynamodb))
    assert redis_view_keys(redis_client) == want_redis
    assert os_docs(app) == want_docs
    app.close()


def test_a_changed_projection_moves_keys_and_old_entries_are_retracted(
    config: Path, dynamodb: Any, redis_client: Any
) -> None:
    for i in range(10):
        put(dynamodb, f"k{i}", "ab"[i % 2], i)
    cfg = yaml.safe_load(config.read_text())
    cfg["tables"] = {TABLE: {"starting_position": "TRIM_HORIZON"}}
    config.write_text(yaml.safe_dump(cfg))
    App.from_file(str(config)).supervisor().run(until_caught_up=True)
    assert "item:k3" in redis_view_keys(redis_client)

    v2 = App.from_file(str(config), registry=load_views(["tests.views_e2e.rebuild_v2"]))
    report = run_rebuild(v2, ["card", "doc"])
    assert report.scanned == 10 and report.retracted == 0  # every item was rewritten
    keys = redis_view_keys(redis_client)
    assert not [k for k in keys if not k.startswith("v2:")], keys
    assert keys["v2:group:a"] == {f"k{i}": float(i) for i in range(0, 10, 2)}
    docs = os_docs(v2)
    assert len(docs) == 10 and all(d["v"] == 2 for d in docs.values())
    v2.close()


def test_a_corrupted_sink_is_repaired_by_a_rebuild(
    config: Path, dynamodb: Any, redis_client: Any, os_client: Any, os_prefix: str
) -> None:
    for i in range(12):
        put(dynamodb, f"k{i}", "abc"[i % 3], i)
    app = App.from_file(str(config))
    run_rebuild(app, ["card", "doc"])  # the first build
    want_redis, want_docs = expected_v1(table_items(dynamodb))
    assert redis_view_keys(redis_client) == want_redis

    redis_client.delete("item:k1", "group:b")  # lost keys
    redis_client.set("item:k2", "garbage")  # edited value
    alias = f"{os_prefix}items"
    os_client.delete(index=alias, id="k4", refresh=True)
    os_client.index(index=alias, id="k5", body={"group": "zzz", "n": -1}, refresh=True)
    os_client.index(index=alias, id="stray", body={"group": "x", "n": 0}, refresh=True)
    dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": "k0"}})  # unseen by any stream read

    report = run_rebuild(app, ["card", "doc"])
    want_redis, want_docs = expected_v1(table_items(dynamodb))
    assert report.retracted >= 1
    assert redis_view_keys(redis_client) == want_redis
    assert os_docs(app) == want_docs
    app.close()


def test_a_worker_that_has_not_acknowledged_blocks_the_scan_with_a_clear_message(
    config: Path, dynamodb: Any
) -> None:
    """A worker that holds a lease of the table, keeps it (its lease is younger than a lease
    duration) and does not take up the new generation blocks the scan; the message names
    it. (A worker holding no lease of the table reads nothing of it and is not waited for.)"""
    put(dynamodb, "k1", "a", 1)
    app = App.from_file(str(config))
    app.store.ensure()
    info = app.client.describe_table(TABLE)
    assert info.stream_arn is not None
    shard = app.client.list_shards(info.stream_arn)[0].shard_id
    app.store.create_lease(Lease(TABLE, shard, info.stream_arn))
    assert app.store.take_lease(app.store.list_leases(TABLE)[0], "stuck-worker")
    app.store.put_worker(WorkerInfo("stuck-worker", time.time() + 30, {}, "hostx", 4242))
    app.store.put_worker(WorkerInfo("idle-worker", time.time(), {}, "hosty", 4343))
    with pytest.raises(HandshakeTimeout) as err:
        run_rebuild(app, ["card"], handshake_timeout=1.0, lease_duration=30.0)
    msg = str(err.value)
    assert "stuck-worker" in msg and "hostx" in msg and "4242" in msg and shard in msg
    assert "idle-worker" not in msg
    assert app.store.generations()["card"] == 1
    app.close()


class _CrashingScan:
    """The real stream client, except that scan raises once after ``pages`` pages."""

    def __init__(self, inner: Any, pages: int) -> None:
        self.inner = inner
        self.left = pages

    def scan(self, *args: Any, **kwargs: Any) -> Any:
        if self.left == 0:
            self.left = -1
            raise RuntimeError("rebuild killed mid-scan")
        self.left -= 1
        return self.inner.scan(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_rebuild_that_crashes_midway_is_run_again_to_the_same_end_state(
    config: Path, dynamodb: Any, redis_client: Any
) -> None:
    for i in range(30):
        put(dynamodb, f"k{i}", "abc"[i % 3], i)
    app = App.from_file(str(config))
    crashing = _CrashingScan(app.client, pages=2)
    views = [app.registry.get("card"), app.registry.get("doc")]
    with pytest.raises(RuntimeError, match="killed mid-scan"):
        rebuild(
            views,
            app.registry,
            crashing,
            app.store,
            app.pipeline,  # type: ignore[arg-type]
            RebuildSettings(segments=1, batch_size=5),
            out=io.StringIO(),
        )
    assert redis_view_keys(redis_client) != expected_v1(table_items(dynamodb))[0]  # partial
    dynamodb.delete_item(TableName=TABLE, Key={"pk": {"S": "k1"}})
    report = run_rebuild(app, ["card", "doc"], segments=2, batch_size=7)
    assert report.scanned == 29
    want_redis, want_docs = expected_v1(table_items(dynamodb))
    assert redis_view_keys(redis_client) == want_redis
    assert os_docs(app) == want_docs
    app.close()


def test_the_rebuild_command_reports_progress_and_a_summary(config: Path, dynamodb: Any) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO, vk_env

    for i in range(12):
        put(dynamodb, f"k{i}", "ab"[i % 2], i)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewkeeper.cli",
            "rebuild",
            "--table",
            TABLE,
            "-c",
            str(config),
            "--segments",
            "2",
            "--max-items-per-second",
            "1000",
        ],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "raised generation" in res.stdout
    assert "12 items scanned" in res.stdout and "applied 24" in res.stdout  # 2 views
    unknown = subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "rebuild", "nosuchview", "-c", str(config)],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unknown.returncode == 78 and "no view named 'nosuchview'" in unknown.stderr
