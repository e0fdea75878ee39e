"""viewkeeper's test bed: real Redis, a Redis Cluster (3 masters + 3 replicas), OpenSearch 2.19
and moto (DynamoDB + Streams) on loopback.

Command line (what ``tests/run`` uses)::

    python -m tests.testbed run -- CMD ARGS...   # start services, run CMD, stop services
    python -m tests.testbed serve                # keep them up; prints `export VAR=URL` lines
    python -m tests.testbed build-opensearch     # only build .cache/opensearch/

Python API::

    from tests.testbed import services, RedisServer, OpenSearchNode, MotoServer

    with services() as bed:          # honours the VIEWKEEPER_TEST_*_URL overrides
        bed.redis_url, bed.opensearch_url, bed.dynamodb_url, bed.redis_cluster_url

    # A test that needs to break a service owns its own instance (the ones started by
    # `tests/run` belong to the launcher process, not to pytest):
    with RedisServer() as redis:     # start() on enter, close() on exit
        url = redis.url              # the port is fixed for the object's life
        redis.stop()                 # or redis.kill() to crash it (SIGKILL)
        redis.start()                # same port again; Redis comes back EMPTY
        redis.restart()              # stop() + start()

    with OpenSearchNode() as node:   # ~5-10 s to start; its own data dir
        node.stop(); node.start()    # same port, data and indices KEPT

    with RedisClusterServer() as cluster:           # ~3 s; 3 masters + 3 replicas
        promoted = cluster.kill_master(cluster.masters()[0])   # and the other fault helpers
    # pytest controls the cluster the launcher started through RemoteClusterControl
    # (fixture redis_cluster_control), which asks the launcher to signal/start processes.

Each service runs in its own process group (stop = SIGTERM to the group, SIGKILL after a
timeout) and gets SIGTERM if the thread that started it dies; the JVM also exits when the
launcher's stdin pipe closes. Logs: .cache/testbed/logs/<service>-<port>.log.
"""

from ._proc import ServiceError, ServiceProcess, free_port
from .launcher import (
    ENV_DYNAMODB,
    ENV_OPENSEARCH,
    ENV_REDIS,
    ENV_REDIS_CLUSTER,
    ENV_REDIS_CLUSTER_CONTROL,
    RunningServices,
    run,
    services,
)
from .moto_server import MotoServer
from .opensearch_node import OpenSearchNode, build_classpath
from .redis_cluster import (
    ClusterControl,
    ClusterNodeServer,
    Node,
    RedisClusterServer,
    RemoteClusterControl,
    SlotMigration,
    key_for_slot,
    slot_of,
)
from .redis_server import RedisServer

__all__ = [
    "ENV_DYNAMODB",
    "ENV_OPENSEARCH",
    "ENV_REDIS",
    "ENV_REDIS_CLUSTER",
    "ENV_REDIS_CLUSTER_CONTROL",
    "ClusterControl",
    "ClusterNodeServer",
    "MotoServer",
    "Node",
    "OpenSearchNode",
    "RedisClusterServer",
    "RedisServer",
    "RemoteClusterControl",
    "RunningServices",
    "ServiceError",
    "ServiceProcess",
    "SlotMigration",
    "build_classpath",
    "free_port",
    "key_for_slot",
    "run",
    "services",
    "slot_of",
]
