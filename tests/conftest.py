"""Fixtures on the real services that `tests/run` starts (see tests/testbed)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from opensearchpy import NotFoundError, OpenSearch
from redis.cluster import RedisCluster

from tests.helpers import Clock
from tests.testbed import (
    ENV_DYNAMODB,
    ENV_OPENSEARCH,
    ENV_REDIS,
    ENV_REDIS_CLUSTER,
    ENV_REDIS_CLUSTER_CONTROL,
    RemoteClusterControl,
)
from tests.testbed.dynamo import boto3_client
from tests.testbed.dynamo import make_table as _make_table
from viewkeeper.coordination.memory import MemoryStore
from viewkeeper.sinks.opensearch import OpenSearchSink

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis_cluster: needs the test bed's Redis Cluster")


def _service_url(var: str) -> str:
    url = os.environ.get(var, "")
    if not url:
        message = f"{var} is not set: run the suite with tests/run (it starts the services)"
        if IN_CI:
            pytest.fail(message)  # in CI a missing service is a failure, never a skip
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service_url(ENV_REDIS)


@pytest.fixture(scope="session")
def opensearch_url() -> str:
    return _service_url(ENV_OPENSEARCH)


@pytest.fixture(scope="session")
def dynamodb_url() -> str:
    return _service_url(ENV_DYNAMODB)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """redis.Redis (bytes replies) on an empty database: FLUSHALL before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    """URL of one node of the Redis Cluster (3 masters + 3 replicas)."""
    return _service_url(ENV_REDIS_CLUSTER)


def _flush_cluster(client: RedisCluster) -> None:
    client.flushall(target_nodes=RedisCluster.PRIMARIES)


@pytest.fixture
def redis_cluster_client(redis_cluster_url: str) -> Iterator[RedisCluster]:
    """redis-py RedisCluster (bytes replies); every master is flushed before and after."""
    client = RedisCluster.from_url(redis_cluster_url)
    _flush_cluster(client)
    yield client
    try:
        _flush_cluster(client)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster_control(redis_cluster_url: str) -> RemoteClusterControl:
    """Control over the cluster's processes, for fault tests (see tests/README-testing.md).

    It exists only when the launcher (python -m tests.testbed run/serve) started the cluster:
    it then exports VIEWKEEPER_TEST_REDIS_CLUSTER_CONTROL. A cluster given by URL alone
    cannot be broken from here: under CI=true that FAILS the test; outside CI it is a skip.
    """
    description = os.environ.get(ENV_REDIS_CLUSTER_CONTROL, "")
    if not description:
        message = (
            f"{ENV_REDIS_CLUSTER}={redis_cluster_url} was given without "
            f"{ENV_REDIS_CLUSTER_CONTROL}: fault tests need the cluster that "
            "`python -m tests.testbed run/serve` starts (unset the URL to let tests/run start it)"
        )
        if IN_CI:
            pytest.fail(message)  # in CI a fault test that cannot run is a failure
        pytest.skip(message)
    return RemoteClusterControl(description)


@pytest.fixture
def redis_cluster_faults(
    redis_cluster_control: RemoteClusterControl,
) -> Iterator[RemoteClusterControl]:
    """The cluster control for a test that breaks the cluster: before the test it is
    healthy and empty; after it, heal() restarts/resumes nodes, closes open slot
    migrations and waits until healthy again, then every master is flushed. Roles and slot
    ranges may differ from the start: read them with masters(), node_for_slot(), ..."""
    redis_cluster_control.heal()
    redis_cluster_control.flush()
    yield redis_cluster_control
    redis_cluster_control.heal()
    redis_cluster_control.flush()


@pytest.fixture
def os_prefix() -> str:
    """A unique lowercase prefix for index/alias/template/script names: ``t-<hex>-``."""
    return f"t-{uuid.uuid4().hex[:10]}-"


def _cleanup_opensearch(client: OpenSearch, prefix: str) -> None:
    pattern = f"{prefix}*"

    def quietly(method: str, path: str, params: dict[str, str] | None = None) -> Any:
        try:
            return client.transport.perform_request(method, path, params=params)
        except NotFoundError:
            return None

    quietly("DELETE", f"/_all/_alias/{pattern}")
    quietly("DELETE", f"/{pattern}", {"expand_wildcards": "all"})
    for kind, key in (
        ("_index_template", "index_templates"),
        ("_component_template", "component_templates"),
    ):
        found = quietly("GET", f"/{kind}/{pattern}") or {}
        for item in found.get(key, []):
            quietly("DELETE", f"/{kind}/{item['name']}")
    for name in quietly("GET", f"/_template/{pattern}") or {}:
        quietly("DELETE", f"/_template/{name}")
    quietly("DELETE", f"/_ingest/pipeline/{pattern}")
    state = quietly("GET", "/_cluster/state/metadata", {"filter_path": "metadata.stored_scripts"})
    scripts = ((state or {}).get("metadata") or {}).get("stored_scripts") or {}
    for script_id in scripts:
        if script_id.startswith(prefix):
            quietly("DELETE", f"/_scripts/{script_id}")


@pytest.fixture
def os_client(opensearch_url: str, os_prefix: str) -> Iterator[OpenSearch]:
    """opensearchpy.OpenSearch; afterwards everything named ``os_prefix*`` is deleted."""
    client = OpenSearch(hosts=[opensearch_url], timeout=30)
    yield client
    try:
        _cleanup_opensearch(client, os_prefix)
    finally:
        client.close()


@pytest.fixture
def dynamodb(dynamodb_url: str) -> Any:
    """boto3 DynamoDB client on moto (us-east-1, credentials testing/testing)."""
    return boto3_client("dynamodb", dynamodb_url)


@pytest.fixture
def dynamodbstreams(dynamodb_url: str) -> Any:
    """boto3 DynamoDB Streams client on moto (same endpoint as DynamoDB)."""
    return boto3_client("dynamodbstreams", dynamodb_url)


@pytest.fixture
def table_name() -> str:
    return f"vk-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_table(dynamodb: Any) -> Iterator[Callable[..., tuple[str, str]]]:
    """``make_table(dynamodb, name, hash_key='pk', range_key=None, stream=True)`` ->
    (table_name, stream_arn); the tables it made are deleted after the test."""
    made: list[tuple[Any, str]] = []

    def factory(
        client: Any, name: str, hash_key: str = "pk", range_key: str | None = None,
        stream: bool = True, **kwargs: str,
    ) -> tuple[str, str]:  # fmt: skip
        result = _make_table(client, name, hash_key, range_key, stream, **kwargs)
        made.append((client, name))
        return result

    yield factory
    for client, name in made:
        with contextlib.suppress(Exception):  # the test may have deleted it already
            client.delete_table(TableName=name)


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand (the sinks' tombstone times)."""
    return Clock()


@pytest.fixture
def make_sink(
    os_client: OpenSearch, os_prefix: str, clock: Clock
) -> Iterator[Callable[..., OpenSearchSink]]:
    """OpenSearch sinks on the test's own index prefix, without replicas, on the test's
    ``clock``; closed when the test ends."""
    made: list[OpenSearchSink] = []

    def factory(**kwargs: Any) -> OpenSearchSink:
        kwargs.setdefault("index_prefix", os_prefix)
        kwargs.setdefault("index_settings", {"number_of_replicas": 0})
        kwargs.setdefault("clock", clock)
        client = kwargs.pop("client", os_client)
        sink = OpenSearchSink("search", client, **kwargs)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        sink.close()


@pytest.fixture(params=["memory", "dynamodb"])
def coord_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The coordination store: in memory, or the DynamoDB one on moto."""
    if request.param == "memory":
        yield MemoryStore()
        return
    from viewkeeper.coordination.dynamodb import DynamoDBStore

    client = request.getfixturevalue("dynamodb")
    store = DynamoDBStore(client, f"vk-coord-{uuid.uuid4().hex[:8]}")
    store.ensure()
    yield store
    client.delete_table(TableName=store.table)
