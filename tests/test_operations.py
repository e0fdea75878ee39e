"""Operating the daemon: systemd notification and drain on SIGTERM, metrics — against moto,
the real Redis and real processes. (The Lambda handler: tests/test_lambda.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, redis_view_keys, vk_env, write_config
from tests.testbed import free_port
from viewkeeper.coordination.dynamodb import DynamoDBStore

TABLE = "e2e-orders"


@pytest.fixture
def config(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: Any,
    dynamodb_url: str,
    redis_url: str,
) -> Path:
    make_table(dynamodb, TABLE, hash_key="order_id")
    return write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.redis_only"],
        tables={TABLE: {"starting_position": "TRIM_HORIZON"}},
    )


def put(db: Any, order_id: str, status: str = "new", customer: str = "alice") -> None:
    db.put_item(
        TableName=TABLE,
        Item={
            "order_id": {"S": order_id},
            "customer_id": {"S": customer},
            "status": {"S": status},
            "total": {"N": "5"},
            "created_at": {"N": "1"},
        },
    )


def start_daemon(config: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config)],
        cwd=REPO,
        env=vk_env() | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_run_speaks_sd_notify_and_drains_on_sigterm(
    config: Path, dynamodb: Any, redis_client: Any, tmp_path: Path, dynamodb_url: str
) -> None:
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(20)
    put(dynamodb, "o1")
    proc = start_daemon(config, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1000000")
    try:
        got: list[str] = []
        while not any("WATCHDOG=1" in m for m in got) or not any("READY=1" in m for m in got):
            got.append(sock.recv(4096).decode())
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=" in ready and "shards" in ready
        wait_for(lambda: "order:o1" in redis_view_keys(redis_client))
        for i in range(2, 40):
            put(dynamodb, f"o{i}")
        proc.send_signal(signal.SIGTERM)
        while True:
            msg = sock.recv(4096).decode()
            if "STOPPING=1" in msg:
                break
        assert proc.wait(30) == 0, proc.stdout.read() if proc.stdout else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    out = proc.stdout.read() if proc.stdout else ""
    assert "stopped cleanly" in out
    table = yaml.safe_load(config.read_text())["coordination"]["table"]
    store = DynamoDBStore(dynamodb, table)
    (lease,) = store.list_leases(TABLE)
    assert lease.owner is None  # released
    # what was read before the signal is applied and checkpointed; the rest is read next time
    subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(config), "--until-caught-up"],
        cwd=REPO,
        env=vk_env(),
        check=True,
        timeout=60,
        capture_output=True,
    )
    keys = redis_view_keys(redis_client)
    assert {f"order:o{i}" for i in range(1, 40)} <= set(keys)


def test_metrics_endpoint_counts_records_and_listens_on_loopback(
    config: Path, dynamodb: Any, redis_client: Any
) -> None:
    port = free_port()
    cfg = yaml.safe_load(config.read_text())
    cfg["metrics"] = {"port": port}
    config.write_text(yaml.safe_dump(cfg))
    for i in range(5):
        put(dynamodb, f"m{i}")
    proc = start_daemon(config)
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def scraped() -> str:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    return str(resp.read().decode())
            except OSError:
                return ""

        wanted = (
            'viewkeeper_records_total{outcome="applied",view="card"} 5.0',
            "viewkeeper_leases_held 1.0",
            # the page's records are counted before its batch time and lag are recorded, so
            # a scrape may fall between them: wait for all of them, not for the first
            "viewkeeper_shard_lag_seconds{",
            "viewkeeper_batch_duration_seconds_count",
        )
        deadline = time.monotonic() + 20
        while True:
            text = scraped()
            missing = [line for line in wanted if line not in text]
            if not missing:
                break
            assert time.monotonic() < deadline, f"never scraped together: {missing}"
            time.sleep(0.05)
        listeners = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{port:04X}" in listeners  # bound to 127.0.0.1, not 0.0.0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
