"""A view on the moto table ``vk-procs``, for the many-processes tests (tests/test_processes.py).

Items are ``{"pk": str, "w": int}``; the view owns ``pr:<pk>`` = ``str(w)``.
``VK_PROCS_SLOW``: seconds to sleep in every projection (a batch in flight long enough to be
killed in the middle of), read once when the daemon imports the module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from viewkeeper import Value, redis_view

TABLE = "vk-procs"
_SLOW = float(os.environ.get("VK_PROCS_SLOW") or 0)


@redis_view(table=TABLE, redis="cache")
def pr_value(item: Mapping[str, Any]) -> Iterator[Value]:
    if _SLOW:
        time.sleep(_SLOW)
    yield Value(f"pr:{item['pk']}", str(item["w"]))


def expected(items: Mapping[str, Mapping[str, Any]]) -> dict[str, object]:
    """The projection of the table's items (pk → item), as tests.helpers.redis_view_keys."""
    return {f"pr:{pk}": str(item["w"]) for pk, item in items.items()}
