"""Processes that take turns on the machine, so configurations measured side by side share the same seconds.

A shared 2-core VM drifts by 10 % or more between fits run one after the other, more than the overheads measured.
Run every configuration at once, one process each, and let only one run at a time: each hands the machine to the next
after a few training steps. Used by ``overhead.py`` and ``scale.py``.
"""

from __future__ import annotations

import time
from typing import Any

TURN_TIMEOUT_S = 600  # a turn is seconds; a process that died holding it must not hang the others


class Relay:
    """One turn at a time between processes, cyclic; sums each one's wall-clock and CPU time in its turns.

    Built in the parent from multiprocessing primitives and handed to the children, which only touch the shared
    arrays while they hold the turn.
    """

    def __init__(self, ctx: Any, n: int) -> None:
        self.turns = [ctx.Event() for _ in range(n)]
        self.finished = ctx.Array("b", n, lock=False)
        self.wall = ctx.Array("d", n, lock=False)
        self.cpu = ctx.Array("d", n, lock=False)
        self._since = (0.0, 0.0)

    def take(self, i: int) -> None:
        """Wait for process ``i``'s turn, then start its clocks (fail, not hang, if the holder died)."""
        if not self.turns[i].wait(timeout=TURN_TIMEOUT_S):
            raise TimeoutError(f"no turn for {TURN_TIMEOUT_S} s: the process holding it died")
        self.turns[i].clear()
        self._since = (time.perf_counter(), time.process_time())

    def give(self, i: int, finished: bool = False) -> None:
        """Stop process ``i``'s clocks and wake the next unfinished one (``i`` itself if it is the last)."""
        wall, cpu = self._since
        self.wall[i] += time.perf_counter() - wall
        self.cpu[i] += time.process_time() - cpu
        self.finished[i] = self.finished[i] or finished
        n = len(self.turns)
        nxt = next((k % n for k in range(i + 1, i + 1 + n) if not self.finished[k % n]), None)
        if nxt is not None:
            self.turns[nxt].set()
