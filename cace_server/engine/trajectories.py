"""Verlet neighbour lists kept per trajectory: structures that evolve step by step.

A trajectory is named by its caller: an i-PI connection (``ipi:...``), an HTTP
client's ``X-CACE-Session`` (``http:...``) or a server-side job. Its consecutive
structures (a bead, step after step) move little, so its neighbour list, built with a
skin, is reused until an atom has moved half the skin (see
:class:`cace_server.model.neighbors.VerletList`).
Structures of one request are told apart by an index: their position in it by default
(i-PI's batched transport sends all beads over one connection), or one the caller
gives (``Engine.submit``'s ``slots``: a job's structure index, stable while its set of
live structures shrinks). An i-PI connection may serve all beads of a step one by one
through one index: it keeps up to ``SLOTS_PER_KEY`` lists there and uses the one that
covers the structure. Any other index is one structure that moves: it keeps one list,
rebuilt in place when the structure has moved out of it (a second list would never be
read again).

The lists are budgeted by bytes (``neighbor_list_bytes``) and by count
(``max_neighbor_lists``): beyond either, the least recently used keys are dropped,
over all trajectories; a list larger than the whole budget is not kept. A finished
job drops its own (``Engine.forget_trajectory``).

Lists are kept per model version: a new version (``Engine.swap_model``) builds its
own, so a changed cutoff never reads a list built for the old one. The species of
each trajectory are kept too: a swap refuses a model lacking one of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from cace_server.engine.models import NeighborListCache, ServedModel
from cace_server.engine.stats import EngineStats
from cace_server.structures import Structure

SLOTS_PER_KEY = 64  # more beads than i-PI runs with on one connection, in practice

_Key = tuple[str, int, str, int]


class TrajectoryLists:
    """(model, trajectory, index) -> the Verlet list(s) of that structure."""

    def __init__(
        self,
        skin: float,
        max_neighbor_lists: int,
        stats: EngineStats,
        max_bytes: int = 512 << 20,
    ) -> None:
        self.skin = skin
        self.max_lists = max_neighbor_lists
        self.max_bytes = max_bytes
        self._stats = stats
        self._lists: OrderedDict[_Key, list[NeighborListCache]] = OrderedDict()
        self._bytes: dict[_Key, int] = {}  # per key, as of its last prepare
        self._total = 0
        self._species: OrderedDict[tuple[str, str], frozenset[int]] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(
        self,
        model_name: str,
        model: ServedModel,
        trajectory: str,
        index: int,
        s: Structure,
        version: int = 0,
        *,
        most_slots: int = SLOTS_PER_KEY,
    ) -> Any:
        """The prepared structure, from the trajectory's kept lists (built anew with no skin).

        ``most_slots``: lists kept for the index; more than one where it may see several
        structures in turn (an i-PI connection serving beads one by one), one where it
        is one structure that moves.
        """
        self._note_species(model_name, trajectory, s)
        if self.skin <= 0:
            self._stats.neighbor_list(reused=False)
            return model.prepare(s)
        key = (model_name, version, trajectory, index)
        most = max(1, most_slots)
        with self._lock:
            slots = self._lists.get(key)
            if slots is None:
                slots = self._lists[key] = []
            self._lists.move_to_end(key)
            # Most recently used first; without a match, the least recently used slot
            # (or a new one) is rebuilt.
            verlet = next((v for v in slots if v.covers(s)), None)
            if verlet is None and len(slots) >= most:
                verlet = slots.pop()
                del slots[most - 1 :]
            elif verlet is None:
                verlet = model.verlet_list(self.skin)
            else:
                slots.remove(verlet)
            slots.insert(0, verlet)
        prepared, reused = verlet.prepare(s)
        self._stats.neighbor_list(reused)
        with self._lock:
            if self._lists.get(key) is slots:  # not dropped meanwhile
                self._set_bytes(key, sum(v.nbytes for v in slots))
            self._evict()
        return prepared

    def _set_bytes(self, key: _Key, n: int) -> None:
        self._total += n - self._bytes.get(key, 0)
        self._bytes[key] = n

    def _drop(self, key: _Key) -> None:
        del self._lists[key]
        self._total -= self._bytes.pop(key, 0)

    def _evict(self) -> None:
        """Drop the least recently used keys beyond the count and the byte budget."""
        while self._lists and (len(self._lists) > self.max_lists or self._total > self.max_bytes):
            self._drop(next(iter(self._lists)))
        self._stats.neighbor_list_bytes(self._total)

    @property
    def nbytes(self) -> int:
        """Bytes the kept lists hold (as of their last use)."""
        with self._lock:
            return self._total

    def lru_order(self) -> list[tuple[str, int]]:
        """(trajectory, index) of the kept lists, least recently used first."""
        with self._lock:
            return [(k[2], k[3]) for k in self._lists]

    def _note_species(self, model_name: str, trajectory: str, s: Structure) -> None:
        key = (model_name, trajectory)
        with self._lock:
            known = key in self._species
            if known:
                self._species.move_to_end(key)
        if known:
            return
        species = frozenset(int(z) for z in set(s.numbers.tolist()))
        with self._lock:
            self._species[key] = species
            while len(self._species) > self.max_lists:
                self._species.popitem(last=False)

    def species(self, model_name: str) -> dict[str, frozenset[int]]:
        """Trajectory -> its elements, for the live trajectories of ``model_name``."""
        with self._lock:
            return {t: z for (name, t), z in self._species.items() if name == model_name}

    def drop_version(self, model_name: str, version: int) -> None:
        """Forget the lists built for a released model version."""
        with self._lock:
            for key in [k for k in self._lists if k[0] == model_name and k[1] == version]:
                self._drop(key)
            self._stats.neighbor_list_bytes(self._total)

    def forget(self, trajectory: str) -> None:
        """Drop every list and the species kept for ``trajectory`` (all models, versions)."""
        with self._lock:
            for key in [k for k in self._lists if k[2] == trajectory]:
                self._drop(key)
            self._stats.neighbor_list_bytes(self._total)
            for name_key in [k for k in self._species if k[1] == trajectory]:
                del self._species[name_key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)
