"""The Redis Cluster sink: the same views on ElastiCache cluster mode, Serverless and MemoryDB.

Every step is one script in one hash slot; README.md in this package gives the protocol
and why a crash between any two steps is repaired by a replay.
"""

from viewkeeper.sinks.redis_cluster.sink import RedisClusterSink

__all__ = ["RedisClusterSink"]
