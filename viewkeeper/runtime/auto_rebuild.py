"""``worker.on_sink_loss: rebuild``: a view whose sink lost its data is rebuilt by this
process, in a thread, one rebuild at a time.

:mod:`viewkeeper.runtime.namespaces` reports the views a sink lost (``on_loss``); each report
calls :meth:`AutoRebuild.start`. A loss reported while a rebuild runs, or a mark the rebuild
could not clear (another loss during its scan), starts another one after it. A failed
rebuild is tried again with backoff (1 s doubling to 60 s). The daemon's own supervisor
publishes the new generation like any holder, so the handshake needs nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

__all__ = ["AutoRebuild"]

log = logging.getLogger("viewkeeper.runtime.auto_rebuild")


class AutoRebuild:
    """``rebuild(names)`` rebuilds those views (and logs its own report);
    ``still_marked()`` names the views the coordination table marks needs_rebuild."""

    def __init__(
        self,
        rebuild: Callable[[list[str]], str],
        still_marked: Callable[[], Collection[str]],
    ) -> None:
        self._rebuild = rebuild
        self._still_marked = still_marked
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self._busy = False

    def start(self, views: list[str]) -> None:
        with self._lock:
            self._wanted.update(views)
            if self._busy:
                return  # the running rebuild picks them up when it ends
            self._busy = True
        threading.Thread(target=self._run, name="auto-rebuild", daemon=True).start()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._lock:
                names = sorted(self._wanted)
                self._wanted.clear()
                if not names:
                    self._busy = False
                    return
            try:
                log.warning("worker.on_sink_loss: rebuild: rebuilding %s", ", ".join(names))
                summary = self._rebuild(names)
                log.warning("worker.on_sink_loss: %s", summary)
                delay = 1.0
            except Exception:
                log.exception("the rebuild of %s after a sink loss failed; trying again", names)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
            marked = set(self._still_marked())
            with self._lock:  # a mark the rebuild could not clear: lost again while it ran
                self._wanted.update(n for n in names if n in marked)
