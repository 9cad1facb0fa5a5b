"""The shared-memory side of i-PI's ``shm`` transport.

i-PI owns six POSIX shared-memory segments per connection (``pos``, ``h``, ``ih``,
``pot``, ``force``, ``vir``), each a C-ordered float64 array with a leading batch
axis: ``pos``/``force`` (batch, 3*natoms), ``h``/``ih``/``vir`` (batch, 3, 3),
``pot`` (batch,). It sends their names with its first POSDATA; we attach without
taking ownership (i-PI unlinks them), read the structures, and write the results
before answering FORCEREADY.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import numpy.typing as npt

from cace_server.ipi.protocol import SHM_SEGMENTS, ProtocolError


def _attach(name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    except TypeError:  # Python < 3.13 registers every attached segment with the tracker
        segment = shared_memory.SharedMemory(name=name)
        # without this our exit would unlink i-PI's segments (and warn about "leaks")
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        return segment


class ShmSegments:
    """i-PI's six segments of one connection, attached, with numpy views."""

    def __init__(self, names: Sequence[str], natoms: int, batch_size: int) -> None:
        if len(names) != len(SHM_SEGMENTS):
            raise ProtocolError(f"expected {len(SHM_SEGMENTS)} shared-memory names")
        self.natoms = natoms
        self.batch_size = batch_size
        shapes = {
            "pos": (batch_size, natoms, 3),
            "h": (batch_size, 3, 3),
            "ih": (batch_size, 3, 3),
            "pot": (batch_size,),
            "force": (batch_size, natoms, 3),
            "vir": (batch_size, 3, 3),
        }
        self._segments: list[shared_memory.SharedMemory] = []
        self._views: dict[str, npt.NDArray[np.float64]] = {}
        try:
            for kind, name in zip(SHM_SEGMENTS, names, strict=True):
                try:
                    segment = _attach(name)
                except (FileNotFoundError, PermissionError, OSError) as exc:
                    raise ProtocolError(f"cannot attach shared memory {name!r}: {exc}") from exc
                self._segments.append(segment)
                shape = shapes[kind]
                need = 8 * int(np.prod(shape))
                if segment.size < need:
                    raise ProtocolError(
                        f"shared memory {name!r} has {segment.size} bytes, "
                        f"{kind} of shape {shape} needs {need}"
                    )
                self._views[kind] = np.ndarray(shape, dtype=np.float64, buffer=segment.buf)
        except BaseException:
            self.close()
            raise

    def read(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Copies of the cells ``h`` (batch, 3, 3) and positions (batch, natoms, 3), Bohr."""
        cells = self._views["h"].copy()
        positions = self._views["pos"].copy()
        if not (np.isfinite(cells).all() and np.isfinite(positions).all()):
            raise ProtocolError("shared memory holds NaN or infinite cell or positions")
        return cells, positions

    def write(
        self,
        energies: npt.NDArray[np.float64],
        forces: npt.NDArray[np.float64],
        virials: npt.NDArray[np.float64],
    ) -> None:
        """Store wire-ready results (atomic units) for the whole batch."""
        self._views["pot"][:] = energies
        self._views["force"][:] = forces
        self._views["vir"][:] = virials

    def close(self) -> None:
        self._views.clear()  # views pin the buffers; drop them before closing
        for segment in self._segments:
            # BufferError: a caller still holds a view; the mapping dies with it
            with contextlib.suppress(BufferError):
                segment.close()
        self._segments.clear()
