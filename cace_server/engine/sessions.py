"""Verlet neighbour lists kept per session: an i-PI connection or an HTTP session id.

A session's consecutive structures (a bead, step after step) move little, so its
neighbour list, built with a skin, is reused until an atom has moved half the skin
(see :class:`cace_server.model.neighbors.VerletList`). Structures of one request
are told apart by their position in it (i-PI's batched transport sends all beads
over one connection). The least recently used sessions are dropped beyond a bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from cace_server.engine.stats import EngineStats
from cace_server.structures import Structure


class SessionLists:
    """(model, session, index in request) -> the Verlet list of that structure."""

    def __init__(self, skin: float, max_neighbor_lists: int, stats: EngineStats) -> None:
        self.skin = skin
        self.max_lists = max_neighbor_lists
        self._stats = stats
        self._lists: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, model_name: str, model: Any, session: str, index: int, s: Structure) -> Any:
        """The prepared structure, from the session's list where the model has them."""
        factory = getattr(model, "verlet_list", None)
        if self.skin <= 0 or factory is None:
            return model.prepare(s)
        key = (model_name, session, index)
        with self._lock:
            verlet = self._lists.get(key)
            if verlet is None:
                verlet = self._lists[key] = factory(self.skin)
            self._lists.move_to_end(key)
            while len(self._lists) > self.max_lists:
                self._lists.popitem(last=False)
        prepared, reused = verlet.prepare(s)
        self._stats.neighbor_list(reused)
        return prepared

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)
