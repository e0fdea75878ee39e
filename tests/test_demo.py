"""`viewkeeper demo`, the README's first command: it must run with nothing but Python."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from tests.helpers import REPO, vk_env


def test_the_demo_shows_views_following_the_table_and_exits_cleanly() -> None:
    env = vk_env()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)  # the demo needs no credentials of the user's
    res = subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "demo", "--pace", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "+ order:o-1001" in out  # a put appears
    assert "+ orders:status:paid" in out and "{o-1001}" in out  # a status moves
    assert "- customer:bob:orders" in out  # a reassignment retracts the old entry
    assert "- customer:bob:spent_cents" in out  # and its contribution to Bob's spend
    assert "~ orders:count:new" in out and "+ orders:count:paid" in out  # counts move
    assert "[carol@1999, alice@4250]" in out  # spend per customer, ranked
    assert "- order:o-1003" in out  # a delete retracts everything it owned
    replay = out.split("replays the stream from the start")[1]
    assert "(no change)" in replay and "dead-lettered 0" in replay
    assert "Traceback" not in res.stderr


def test_the_demo_leaves_a_users_names_alone_and_removes_its_own(
    redis_client: Any, os_client: Any, redis_url: str, opensearch_url: str
) -> None:
    """#19: pointed at an OpenSearch holding another deployment's `orders` index, the demo
    discarded its own orders as stale against the other's versions and printed the other's
    documents as its own. It now writes only `viewkeeper-demo-...` / `viewkeeper-demo:...`,
    says so, leaves the user's `orders` and `order:o-1001` as they were, and removes its own
    names at the end (`--keep` leaves them)."""
    redis_client.set("order:o-1001", "an application's own value")
    os_client.indices.create(index="orders", body={"settings": {"number_of_replicas": 0}})
    os_client.index(index="orders", id="o-1001", body={"mine": True}, refresh=True)
    try:
        for keep in (True, False):
            res = demo("--redis-url", redis_url, "--opensearch-url", opensearch_url,
                       *(["--keep"] if keep else []))  # fmt: skip
            assert res.returncode == 0, res.stdout + res.stderr
            assert "only its own names" in res.stdout and "viewkeeper-demo" in res.stdout
            listing = res.stdout.split("OpenSearch index 'viewkeeper-demo-orders'")[1]
            assert "'customer_id': 'carol'" in listing and "mine" not in listing
            left = list(redis_client.scan_iter(match="viewkeeper-demo:*"))
            indexes = os_client.indices.get(index="viewkeeper-demo-*", expand_wildcards="all")
            assert bool(left) is keep and bool(indexes) is keep
        assert redis_client.get("order:o-1001") == b"an application's own value"
        assert os_client.get(index="orders", id="o-1001")["_source"] == {"mine": True}
        assert os_client.count(index="orders")["count"] == 1
    finally:
        os_client.indices.delete(index="orders", ignore_unavailable=True)


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", "demo", "--pace", "0", *args],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
