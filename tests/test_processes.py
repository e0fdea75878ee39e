"""Many processes on one host (issue #14): ``viewkeeper run --processes N`` — one parent,
N children sharing the shards through the leases — and separately started instances.

Real processes against the real Redis and moto (a moto table has one shard that never
closes: the kill tests), or against :class:`tests.fakestream_server.FakeStreamServer`
(the fake's multi-shard stream over HTTP, everything else forwarded to moto: balance,
metrics, drain, separate instances). Every wait is a deadline, never a timing assertion:
the machine has two cores and other runs share them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.fakestream_server import FakeStreamServer
from tests.helpers import REPO, redis_view_keys, vk, vk_env, write_config
from tests.testbed import free_port
from tests.testbed.dynamo import boto3_client
from tests.views_e2e import procs_views, scale_views
from viewkeeper.config.model import MetricsConfig
from viewkeeper.coordination.dynamodb import DynamoDBStore
from viewkeeper.coordination.model import Lease
from viewkeeper.ops.processes import Parent, _Child, resolve
from viewkeeper.stream.fake import FakeStream

LEASE = 3.0  # worker.lease_duration of the processes


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def pid_of(owner: str | None) -> int | None:
    """Worker ids are ``<host>-<pid>-<random>``."""
    return None if owner is None else int(owner.rsplit("-", 2)[1])


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Run:
    """A ``viewkeeper run`` process (a parent with ``--processes``, or a single one)."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[int, int]:
        """index → pid of the children started last (from the parent's log)."""
        found = re.findall(r"started child (\d+) \(pid (\d+)\)", self.output())
        return {int(i): int(p) for i, p in found}

    def live_children(self) -> list[int]:
        return [p for p in self.children().values() if alive(p)]

    def terminate(self, timeout: float = 60.0) -> int:
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"pid {self.pid} did not drain within {timeout}s:\n{self.output()[-3000:]}")


@dataclass
class Bed:
    """A config on moto or on the fake stream, the real Redis, and the runs started on it."""

    tmp: Path
    config: Path
    store: DynamoDBStore
    table: str
    redis: redis.Redis
    expected: Callable[[], dict[str, object]]
    metrics_port: int
    runs: list[Run] = field(default_factory=list)

    def start(self, *args: str, **env: str) -> Run:
        log = self.tmp / f"run-{len(self.runs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(self.config), *args],
                cwd=REPO,
                env=vk_env() | env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        run = Run(popen, log)
        self.runs.append(run)
        return run

    def leases(self) -> list[Lease]:
        with contextlib.suppress(Exception):  # the table may not exist yet
            return self.store.list_leases(self.table)
        return []

    def held_by(self) -> Counter[int | None]:
        return Counter(pid_of(lease.owner) for lease in self.leases())

    def converged(self) -> bool:
        return redis_view_keys(self.redis) == self.expected()

    def wait_converged(self, timeout: float = 90.0) -> None:
        wait_until(self.converged, timeout, "Redis to equal the projection of the table")

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""

    def close(self) -> None:
        for run in self.runs:
            pids = run.children().values()
            if run.popen.poll() is None:
                run.popen.kill()
                run.popen.wait(10)
            for pid in pids:  # no child may outlive its test, whatever happened
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _store(config: Path, dynamodb_url: str) -> DynamoDBStore:
    table = yaml.safe_load(config.read_text())["coordination"]["table"]
    store = DynamoDBStore(boto3_client("dynamodb", dynamodb_url), table)
    store.ensure()  # made once here: processes starting together race to create it
    return store


@dataclass
class MotoItems:
    db: Any
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: int = 0

    def put(self, pk: str) -> None:
        self.written += 1
        self.db.put_item(
            TableName=procs_views.TABLE,
            Item={"pk": {"S": pk}, "w": {"N": str(self.written)}},
        )
        self.items[pk] = {"pk": pk, "w": self.written}


@pytest.fixture
def moto_bed(
    tmp_path: Path,
    dynamodb: Any,
    make_table: Any,
    redis_client: redis.Redis,
    dynamodb_url: str,
    redis_url: str,
) -> Iterator[tuple[Bed, MotoItems]]:
    make_table(dynamodb, procs_views.TABLE)
    port = free_port()
    config = write_config(
        tmp_path,
        dynamodb_url=dynamodb_url,
        redis_url=redis_url,
        views=["tests.views_e2e.procs_views"],
        tables={procs_views.TABLE: {"starting_position": "TRIM_HORIZON"}},
        worker={"lease_duration": LEASE, "poll_interval": 0.05, "batch_size": 50},
        metrics={"port": port},
    )
    items = MotoItems(dynamodb)
    bed = Bed(
        tmp_path,
        config,
        _store(config, dynamodb_url),
        procs_views.TABLE,
        redis_client,
        lambda: procs_views.expected(items.items),
        port,
    )
    yield bed, items
    bed.close()


@pytest.fixture
def fake_bed(
    tmp_path: Path, redis_client: redis.Redis, dynamodb_url: str, redis_url: str
) -> Iterator[Callable[[int], tuple[Bed, FakeStream]]]:
    servers: list[FakeStreamServer] = []
    beds: list[Bed] = []

    def make(shards: int) -> tuple[Bed, FakeStream]:
        fake = FakeStream()
        fake.create_table("scale", ("pk",), shards=shards)
        server = FakeStreamServer(fake, dynamodb_url).start()
        servers.append(server)
        port = free_port()
        config = write_config(
            tmp_path,
            dynamodb_url=server.url,
            redis_url=redis_url,
            views=["tests.views_e2e.scale_views"],
            tables={"scale": {"starting_position": "TRIM_HORIZON"}},
            worker={"lease_duration": LEASE, "poll_interval": 0.05},
            metrics={"port": port},
        )
        bed = Bed(
            tmp_path,
            config,
            _store(config, dynamodb_url),
            "scale",
            redis_client,
            lambda: scale_views.expected(fake.contents("scale")),
            port,
        )
        beds.append(bed)
        return bed, fake

    yield make
    for bed in beds:
        for run in bed.runs:
            if run.popen.poll() is None or run.popen.returncode != 0:
                print(f"--- viewkeeper pid {run.pid} ---\n{run.output()[-4000:]}")
        bed.close()
    for server in servers:
        server.stop()


def write_fake(fake: FakeStream, n: int, start: int = 0, keys: int = 120) -> int:
    for w in range(start + 1, start + n + 1):
        fake.put_item("scale", {"pk": f"k{w % keys}", "w": w})
    return start + n


def metric_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', head))
        out.append((labels, float(value)))
    return out


# --- moto: kills ---------------------------------------------------------------------------


def test_a_child_killed_mid_batch_is_restarted_and_the_table_converges_exactly(
    moto_bed: tuple[Bed, MotoItems],
) -> None:
    bed, items = moto_bed
    for i in range(300):
        items.put(f"k{i}")
    # a page of 50 takes ~1 s to project: the holder is always in the middle of one
    parent = bed.start("--processes", "2", VK_PROCS_SLOW="0.02")
    wait_until(lambda: len(parent.live_children()) == 2, 60, "two children")
    wait_until(lambda: len(redis_view_keys(bed.redis)) >= 60, 90, "a page or two applied")
    (lease,) = bed.leases()
    victim = pid_of(lease.owner)
    assert victim in parent.children().values(), (lease.owner, parent.children())
    applied_before = len(redis_view_keys(bed.redis))
    os.kill(victim, signal.SIGKILL)
    for i in range(300, 360):  # more writes while the shard changes hands
        items.put(f"k{i % 320}")
    wait_until(
        lambda: pid_of(bed.leases()[0].owner) not in (None, victim),
        60,
        "the killed child's shard to be taken over",
    )
    wait_until(
        lambda: len(parent.live_children()) == 2 and victim not in parent.live_children(),
        60,
        "the killed child to be replaced",
    )
    bed.wait_converged()
    assert applied_before < 300  # the kill came before the end: a batch was in flight
    out = parent.output()
    assert re.search(rf"child \d \(pid {victim}\) ended \(killed by SIGKILL\)", out), out[-3000:]
    assert re.search(r"INFO viewkeeper.cli child=[01] viewkeeper .* running as", out), out[-3000:]
    assert parent.terminate() == 0, parent.output()[-3000:]
    assert [lease.owner for lease in bed.leases()] == [None]


def test_a_parent_killed_with_9_takes_its_children_down_and_a_restart_converges(
    moto_bed: tuple[Bed, MotoItems],
) -> None:
    bed, items = moto_bed
    for i in range(40):
        items.put(f"k{i}")
    parent = bed.start("--processes", "2")
    wait_until(lambda: len(parent.live_children()) == 2, 60, "two children")
    bed.wait_converged()
    children = parent.live_children()
    parent.popen.send_signal(signal.SIGKILL)
    parent.popen.wait(10)
    # PR_SET_PDEATHSIG: SIGTERM, the graceful drain: they exit and release their leases
    wait_until(lambda: not any(alive(p) for p in children), 60, "the orphans to exit")
    assert [lease.owner for lease in bed.leases()] == [None]
    for i in range(40, 80):
        items.put(f"k{i}")
    again = bed.start("--processes", "2")
    bed.wait_converged()
    assert again.terminate() == 0, again.output()[-3000:]


def test_a_child_exiting_78_stops_every_process_with_78(moto_bed: tuple[Bed, MotoItems]) -> None:
    """A config that cannot work (here: broken after the start, seen by a restarted child)
    is not restarted into: the parent drains the others and exits 78, like one process."""
    bed, items = moto_bed
    items.put("k0")
    parent = bed.start("--processes", "2")
    wait_until(lambda: len(parent.live_children()) == 2, 60, "two children")
    bed.wait_converged()
    bed.config.write_text(bed.config.read_text() + "\nworker: {batch_size: 0}\n")
    # The child that does not hold the one lease is killed: a SIGKILL leaves its lease to
    # expire, and what this test checks is that the holder drains and releases its own.
    holder = pid_of(bed.leases()[0].owner)
    assert holder in parent.children().values(), (holder, parent.children())
    victim = next(pid for pid in parent.children().values() if pid != holder)
    os.kill(victim, signal.SIGKILL)
    assert parent.popen.wait(90) == 78, parent.output()[-3000:]
    assert "exited 78" in parent.output()
    assert not parent.live_children()
    assert [lease.owner for lease in bed.leases()] == [None]  # the holder drained


def test_sd_notify_is_spoken_by_the_parent_for_every_child(
    moto_bed: tuple[Bed, MotoItems], tmp_path: Path
) -> None:
    bed, items = moto_bed
    items.put("k0")
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    parent = bed.start("--processes", "2", NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    got: list[str] = []

    def until(pred: Callable[[str], bool]) -> str:
        while True:
            msg = sock.recv(4096).decode()
            got.append(msg)
            if pred(msg):
                return msg

    try:
        ready = until(lambda m: "READY=1" in m)
        assert "STATUS=2/2 processes, 1 shards" in ready, ready
        until(lambda m: "WATCHDOG=1" in m)
        victim = parent.children()[0]
        os.kill(victim, signal.SIGKILL)
        unhealthy = until(lambda m: "unhealthy" in m)
        assert "WATCHDOG=1" not in unhealthy and "child 0 not running" in unhealthy, unhealthy
        # pings resume once the replacement is ready and turning
        until(lambda m: "WATCHDOG=1" in m)
        assert victim not in parent.live_children()
        parent.popen.send_signal(signal.SIGTERM)
        until(lambda m: "STOPPING=1" in m)
        assert parent.popen.wait(60) == 0, parent.output()[-3000:]
    finally:
        sock.close()
    # the children talked to the parent only: one READY, from the parent
    assert sum("READY=1" in m for m in got) == 1, got


# --- the fake stream: balance, drain, metrics, separate instances -------------------------


def test_leases_spread_metrics_add_up_and_sigterm_drains_every_child(
    fake_bed: Callable[[int], tuple[Bed, FakeStream]],
) -> None:
    shards, n = 8, 2
    bed, fake = fake_bed(shards)
    parent = bed.start("--processes", str(n))
    wait_until(lambda: len(parent.live_children()) == n, 60, "the children")
    bound = math.ceil(shards / n) + 1

    def per_child() -> list[int]:
        counts = bed.held_by()
        return [counts.get(p, 0) for p in parent.live_children()] if None not in counts else []

    def settled() -> bool:
        per = per_child()
        return sum(per) == shards and max(per) <= bound

    # the settling time (README): a deadline here, not an assertion
    wait_until(settled, 90, f"every shard held, none by more than ceil(S/N)+1 = {bound}")

    # then the steady state, where no steal happens any more (a steal while records flow
    # re-reads a page: counted twice, as at-least-once allows, and the sum below would not
    # be exact): the two differ by at most one
    def even() -> bool:
        per = per_child()
        return sum(per) == shards and max(per) - min(per) <= 1

    wait_until(even, 90, "an even spread (4/4)")
    assert max(per_child()) <= bound
    owners = {lease.shard_id: lease.owner for lease in bed.leases()}
    written = write_fake(fake, 400)
    bed.wait_converged()
    # a lease that changed hands meanwhile (its renewal late on a loaded machine: seen once
    # in a full run, 470 counted for 400) re-reads from its checkpoint: counted twice, as
    # at-least-once allows
    after = {lease.shard_id: lease.owner for lease in bed.leases()}
    moved = [shard for shard, owner in owners.items() if after.get(shard) != owner]

    def scraped_total() -> float:
        text = bed.scrape()
        return sum(v for _, v in metric_values(text, "viewkeeper_records_total"))

    wait_until(lambda: scraped_total() >= written, 30, "the counters to reach the endpoint")
    text = bed.scrape()
    by_outcome = Counter[str]()
    for labels, value in metric_values(text, "viewkeeper_records_total"):
        assert labels["view"] == "sc_value", labels
        by_outcome[labels["outcome"]] += value
    # one view: every record written is counted once, applied or stale, over both children
    if moved:
        assert sum(by_outcome.values()) >= written, (by_outcome, written, moved)
    else:
        assert sum(by_outcome.values()) == written, (by_outcome, written)
    leases = {lab["process"]: v for lab, v in metric_values(text, "viewkeeper_leases_held")}
    assert set(leases) == {"0", "1"}, leases  # one series per child, named by its index
    assert sum(leases.values()) == shards, leases
    assert all(v <= bound for v in leases.values()), leases

    more = write_fake(fake, 200, start=written)  # writes while it drains
    assert parent.terminate() == 0, parent.output()[-3000:]
    assert parent.output().count("stopped cleanly") == n
    assert all(lease.owner is None for lease in bed.leases()), bed.leases()
    assert not parent.live_children()
    # nothing lost: what the drain did not apply is read by the next run
    rest = vk("run", "--until-caught-up", "-c", str(bed.config), timeout=120)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert more == written + 200
    bed.wait_converged(timeout=10)


def test_two_separate_instances_with_one_config_both_run_and_converge(
    fake_bed: Callable[[int], tuple[Bed, FakeStream]],
) -> None:
    bed, fake = fake_bed(6)
    first = bed.start()
    wait_until(lambda: "metrics on http" in first.output(), 60, "the first instance's metrics")
    second = bed.start()
    written = write_fake(fake, 200)

    def both_hold() -> bool:
        counts = bed.held_by()
        return counts.get(first.pid, 0) >= 1 and counts.get(second.pid, 0) >= 1

    wait_until(both_hold, 90, "both instances to hold leases")
    wait_until(lambda: sum(bed.held_by().values()) == 6 and None not in bed.held_by(), 60, "all")
    written = write_fake(fake, 200, start=written)
    bed.wait_converged()
    assert first.popen.poll() is None and second.popen.poll() is None
    warned = [
        line
        for line in second.output().splitlines()
        if f"127.0.0.1:{bed.metrics_port}" in line and "WARNING" in line
    ]
    assert len(warned) == 1, second.output()[-3000:]
    assert "running without a metrics endpoint" in warned[0]
    assert "metrics endpoint" not in first.output()
    status = vk("status", "-c", str(bed.config))
    assert status.returncode == 0, status.stderr
    hosts = {f"{socket.gethostname()}/{p}" for p in (first.pid, second.pid)}
    assert hosts <= set(status.stdout.split()), status.stdout
    assert first.terminate() == 0 and second.terminate() == 0


# --- arguments -----------------------------------------------------------------------------


def test_bad_processes_arguments_are_refused_with_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "viewkeeper.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "aws": {"region": "us-east-1", "endpoint_url": "http://127.0.0.1:1"},
                "views": ["tests.views_e2e.procs_views"],
                "redis": {"cache": {"url": "redis://127.0.0.1:1/0"}},
            }
        )
    )
    res = vk("run", "-c", str(config), "--processes", "0")
    assert res.returncode == 2, res.stderr
    assert "--processes 0: use a whole number of processes from 1, or auto" in res.stderr
    res = vk("run", "-c", str(config), "--processes", "two")
    assert res.returncode == 2 and "--processes two" in res.stderr, res.stderr
    res = vk("run", "-c", str(config), "--processes", "2", "--until-caught-up")
    assert res.returncode == 2, res.stderr
    assert "a batch run is one process" in res.stderr, res.stderr


# --- the parent's bookkeeping, without children's daemons -----------------------------------


def test_processes_auto_is_the_usable_cores() -> None:
    assert resolve("auto") == resolve("AUTO") == len(os.sched_getaffinity(0))
    assert resolve(3) == resolve("3") == 3
    for bad in (0, "0", "-1", "many"):
        with pytest.raises(ValueError, match="from 1, or auto"):
            resolve(bad)


def test_the_watchdog_is_withheld_for_a_child_that_stopped_pinging_or_is_gone(
    tmp_path: Path,
) -> None:
    parent = Parent(
        "viewkeeper.yaml",
        3,
        MetricsConfig(port=None),
        lambda *a: None,
        environ={"WATCHDOG_USEC": "4000000"},  # the parent pings every 2 s
    )
    assert parent.child_watchdog == 4.0  # a child must ping at least that often
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for i, popen in enumerate(sleepers):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            parent.children.append(_Child(i, sock, str(tmp_path / f"{i}.sock"), popen))
        now = 1000.0
        statuses = ["3 shards, worst lag 0.5s", "unhealthy: 2 shards, worst lag 7.25s", ""]
        for child, status in zip(parent.children, statuses, strict=True):
            child.pinged_at, child.status = now - 1.0, status
        assert parent.turning(now) == []
        assert parent.summary() == (5, 7.25)  # shards summed, the worst lag
        assert parent.status_line() == "3/3 processes, 5 shards, worst lag 7.2s"
        parent.children[1].pinged_at = now - 4.5  # alive, but its loop stopped turning
        sleepers[2].kill()
        sleepers[2].wait()
        assert parent.turning(now) == ["child 1 not turning", "child 2 not running"]
    finally:
        for popen in sleepers:
            popen.kill()
            popen.wait()
        for child in parent.children:
            child.sock.close()
