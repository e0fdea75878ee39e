"""Which replicas a master has, as it says itself, and what a wait for them answered.

Owns :func:`_replicas_listed` (a master's ``CLUSTER NODES`` and ``INFO replication`` replies
read into its replica count), :func:`_refused` (a WAIT refused for good) and the two
exceptions by which a pipeline's calls are sent again (README.md, "Claims"); the
connection's ``_send_node`` sends the commands and uses these.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from typing import Any

import redis
from redis.exceptions import NoPermissionError


class _NotReplicated(Exception):
    """A master did not pass a pipeline's writes to its replicas within the wait."""


class _MoreReplicas(Exception):
    """A master lists more replicas than its pipeline waited for: sent again at once."""


def _replicas_listed(nodes: Any, info: Any) -> int | None:
    """How many replicas a master has, as it says itself: those its ``CLUSTER NODES`` (as
    redis-py parses it) lists as its own, failed ones aside, together with the cluster nodes
    ``INFO replication`` shows attached to it in any state (a replica that has just joined,
    still syncing, is attached before gossip tells its master; one cut off is still listed).
    An attached client that is no cluster node (``redis-cli --replica``, a CDC tool) is never
    promoted and never counted, nor is an address that is a master's (a replica announced
    behind NAT at another node's address); addresses are compared once their host names are
    resolved (``replica-announce-ip localhost``). None when CLUSTER NODES was refused."""
    if not isinstance(nodes, dict):
        return None
    me = next((n["node_id"] for n in nodes.values() if "myself" in n["flags"].split(",")), None)
    ids = {_address(a.split("@")[0]): n["node_id"] for a, n in nodes.items()}
    mine = {
        n["node_id"]
        for n in nodes.values()
        if n.get("master_id") == me
        and not {"fail", "handshake", "noaddr"} & set(n["flags"].split(","))
    }
    masters = {n["node_id"] for n in nodes.values() if "master" in n["flags"].split(",")}
    if isinstance(info, dict):
        for key, replica in info.items():
            if key.startswith("slave") and isinstance(replica, dict):
                node = ids.get(_address(f"{replica.get('ip')}:{replica.get('port')}"))
                if node is not None and node not in masters:  # a master's address: NAT, an
                    mine.add(node)  # announce setting; the replica is listed already
    return len(mine)


@functools.lru_cache(maxsize=1024)
def _address(address: str) -> str:
    """host:port with the host resolved to its address (as it was, if it does not resolve)."""
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError):
        host = socket.gethostbyname(host)
    return f"{host}:{port}"


def _refused(exc: redis.ResponseError) -> bool:
    """Whether WAIT was refused for good (a managed service or an ACL without it), not for
    the node's state."""
    return isinstance(exc, NoPermissionError) or "unknown command" in str(exc).lower()
