"""The Redis sink: one Lua script call applies a batch of changes, each one atomically.

The key layout and the design are in README.md, next to this file. The modules, each one
built on the ones before it: ``packing`` (the bytes stored and sent), ``connection`` (the
client, retries, scripts, the server's limits, view ids), ``claims`` (the view's claim and
its write counter), ``apply`` (changes in script calls, replies to results),
``maintenance`` (sweep, purge, wipe, owner records read back) and ``sink`` (RedisSink).
"""

from viewkeeper.sinks.redis.packing import OwnerRecord, pack_version, unpack_version
from viewkeeper.sinks.redis.sink import RedisSink

__all__ = ["OwnerRecord", "RedisSink", "pack_version", "unpack_version"]
