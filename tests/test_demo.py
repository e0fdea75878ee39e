"""`viewkeeper demo`, the README's first command: it must run with nothing but Python."""

from __future__ import annotations

import subprocess
import sys

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
    assert "- order:o-1003" in out  # a delete retracts everything it owned
    replay = out.split("replays the stream from the start")[1]
    assert "(no change)" in replay and "dead-lettered 0" in replay
    assert "Traceback" not in res.stderr
