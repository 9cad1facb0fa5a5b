"""Verlet neighbour lists kept per trajectory: structures that evolve step by step.

A trajectory is named by its caller: an i-PI connection (``ipi:...``) or an HTTP
client's ``X-CACE-Session`` (``http:...``). Its consecutive structures (a bead, step
after step) move little, so its neighbour list, built with a skin, is reused until an
atom has moved half the skin (see :class:`cace_server.model.neighbors.VerletList`).
Structures of one request are told apart by their position in it (i-PI's batched
transport sends all beads over one connection). One position may still see several
structures in turn (one i-PI connection serving all beads of a step one by one): it
keeps up to ``SLOTS_PER_KEY`` lists and uses the one that covers the structure. The
least recently used keys are dropped beyond a bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from cace_server.engine.models import ServedModel
from cace_server.engine.stats import EngineStats
from cace_server.structures import Structure

SLOTS_PER_KEY = 64  # more beads than i-PI runs with on one connection, in practice


class TrajectoryLists:
    """(model, trajectory, index in request) -> the Verlet list of that structure."""

    def __init__(self, skin: float, max_neighbor_lists: int, stats: EngineStats) -> None:
        self.skin = skin
        self.max_lists = max_neighbor_lists
        self._stats = stats
        self._lists: OrderedDict[tuple[str, str, int], list[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(
        self, model_name: str, model: ServedModel, trajectory: str, index: int, s: Structure
    ) -> Any:
        """The prepared structure, from the trajectory's kept lists (built anew with no skin)."""
        if self.skin <= 0:
            self._stats.neighbor_list(reused=False)
            return model.prepare(s)
        key = (model_name, trajectory, index)
        with self._lock:
            slots = self._lists.get(key)
            if slots is None:
                slots = self._lists[key] = []
            self._lists.move_to_end(key)
            while len(self._lists) > self.max_lists:
                self._lists.popitem(last=False)
            # Most recently used first; without a match, the least recently used slot
            # (or a new one) is rebuilt.
            verlet = next((v for v in slots if v.covers(s)), None)
            if verlet is None and len(slots) >= SLOTS_PER_KEY:
                verlet = slots.pop()
            elif verlet is None:
                verlet = model.verlet_list(self.skin)
            else:
                slots.remove(verlet)
            slots.insert(0, verlet)
        prepared, reused = verlet.prepare(s)
        self._stats.neighbor_list(reused)
        return prepared

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)
