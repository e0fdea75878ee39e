"""A view on the fake stream's table ``scale``, for the multi-process supervisor tests
(tests/test_supervisor.py), with a spy.

Items are ``{"pk": str, "w": int}``: ``w`` is the writer's global write counter, so each
record of the stream has its own ``w``. The view owns ``sc:<pk>`` = ``str(w)``.

Environment (read once, when the module is imported by the viewkeeper process):

- ``VK_SCALE_SPY_DIR``: every projection appends ``<epoch seconds> <pid> <pk> <w>`` to
  ``<dir>/<pid>.log`` with one unbuffered ``write`` on an O_APPEND descriptor, so a kill -9
  loses no line that was written. A view does not know its shard; the test maps ``pk`` to
  its shard from the fake stream afterwards. The projection runs just before the sink
  applies the page, so the time is the apply time within one batch duration.
- ``VK_SCALE_SLOW``: seconds to sleep in every projection (a busy batch, for SIGTERM tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from viewkeeper import Value, redis_view

_SPY_DIR = os.environ.get("VK_SCALE_SPY_DIR")
_SLOW = float(os.environ.get("VK_SCALE_SLOW") or 0)
_fd: int | None = None


def _spy(item: Mapping[str, Any]) -> None:
    global _fd
    if _SPY_DIR is None:
        return
    if _fd is None:
        path = os.path.join(_SPY_DIR, f"{os.getpid()}.log")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{time.time():.6f} {os.getpid()} {item['pk']} {item['w']}\n".encode())


@redis_view(table="scale", redis="cache")
def sc_value(item: Mapping[str, Any]) -> Iterator[Value]:
    if _SLOW:
        time.sleep(_SLOW)
    _spy(item)
    yield Value(f"sc:{item['pk']}", str(item["w"]))


def expected(contents: Mapping[str, Mapping[str, Any]]) -> dict[str, object]:
    """The projection of the table's items, in the shape of tests.helpers.redis_view_keys."""
    return {f"sc:{item['pk']}": str(item["w"]) for item in contents.values()}
