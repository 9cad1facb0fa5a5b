"""CACEPotential: energy, forces and virial/stress of batches of structures.

Pure computation: structures in, predictions out. No I/O, threads or servers.
Geometry (positions, cell, strain, edge vectors) is kept in float64 whatever the
model's dtype; the network runs in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cace_server.model.config import ModelConfig
from cace_server.model.ewald import EwaldSum
from cace_server.model.mlp import AtomwiseReadout
from cace_server.model.neighbors import GraphBatch, PreparedStructure, collate, prepare_structure
from cace_server.model.representation import CACERepresentation
from cace_server.structures import Prediction, Structure


@dataclass
class BatchOutput:
    """Tensors of one evaluation (before conversion to numpy)."""

    energy: torch.Tensor  # [B]
    atom_energy: torch.Tensor  # [N] short-range + reference energies
    charges: torch.Tensor | None  # [N]
    forces: torch.Tensor | None  # [N, 3]
    virial: torch.Tensor | None  # [B, 3, 3] = -dE/d(strain)


class CACEPotential(torch.nn.Module):
    atomic_energies: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.representation = CACERepresentation(config)
        n_in = self.representation.n_features
        self.readouts = torch.nn.ModuleDict(
            {
                r.name: AtomwiseReadout(n_in, r.hidden, r.activation, r.bias, r.linear_branch)
                for r in config.readouts
            }
        )
        self.energy_readouts = [r.name for r in config.readouts if r.kind == "energy"]
        self.ewald = EwaldSum(config.ewald) if config.ewald is not None else None
        self._group_atoms: int | None = None
        reference = torch.tensor(
            [config.atomic_energies.get(z, 0.0) for z in config.elements],
            dtype=torch.get_default_dtype(),
        )
        self.register_buffer("atomic_energies", reference)

    # -- properties ------------------------------------------------------------------------
    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(self.config.elements)

    @property
    def cutoff(self) -> float:
        return float(self.config.cutoff)

    @property
    def dtype(self) -> torch.dtype:
        return self.representation.radial_mixing.dtype

    @property
    def device(self) -> torch.device:
        return self.representation.radial_mixing.device

    @property
    def has_charges(self) -> bool:
        return self.ewald is not None

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- evaluation --------------------------------------------------------------------------
    def prepare(self, structure: Structure) -> PreparedStructure:
        """Validate a structure and build its neighbour list (CPU, numpy)."""
        return prepare_structure(structure, self.config.elements, self.cutoff)

    def compute(
        self,
        batch: GraphBatch,
        *,
        forces: bool = True,
        virial: bool = True,
        create_graph: bool = False,
    ) -> BatchOutput:
        """Evaluate a collated batch; ``create_graph`` keeps forces differentiable (training)."""
        dtype = self.dtype
        positions = batch.positions
        cell = batch.cell
        if forces:
            positions = positions.detach().requires_grad_(True)
        strain = None
        if virial:
            strain = torch.zeros_like(cell, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            deformed = positions + torch.einsum("ni,nij->nj", positions, sym[batch.system])
            cell = cell + cell @ sym
        else:
            deformed = positions
        vectors = (
            deformed.index_select(0, batch.receivers)
            - deformed.index_select(0, batch.senders)
            - self._images(batch, cell)
        )
        features = self.representation(
            vectors.to(dtype), batch.species, batch.receivers, batch.senders
        )
        atom_energy = self.atomic_energies.to(dtype)[batch.species]
        for name in self.energy_readouts:
            atom_energy = atom_energy + self.readouts[name](features)
        energy = atom_energy.new_zeros(batch.n_systems).index_add(0, batch.system, atom_energy)
        charges = None
        if self.ewald is not None:
            charges = self.readouts[self.ewald_charge_key](features)
            energy = energy + self.ewald(deformed, charges, cell, batch.pbc, batch.n_atoms)

        force_out = virial_out = None
        inputs = [t for t in (positions if forces else None, strain) if t is not None]
        if inputs and not energy.requires_grad:
            # Nothing depends on the geometry (e.g. isolated atoms, no neighbour pairs).
            if forces:
                force_out = torch.zeros_like(positions)
            if virial:
                virial_out = torch.zeros_like(batch.cell)
        elif inputs:
            grads = torch.autograd.grad(
                energy.sum(), inputs, create_graph=create_graph, allow_unused=True
            )
            k = 0
            if forces:
                g = grads[k]
                force_out = -g if g is not None else torch.zeros_like(positions)
                k += 1
            if virial:
                g = grads[k]
                virial_out = -g if g is not None else torch.zeros_like(batch.cell)
        return BatchOutput(energy, atom_energy, charges, force_out, virial_out)

    @staticmethod
    def _images(batch: GraphBatch, cell: torch.Tensor) -> torch.Tensor:
        """Cartesian image shift of each edge's sender: unit_shifts @ cell of its system.

        Edges are sorted by receiver, so each system owns a contiguous range of edges
        and one small matrix product per system avoids a [edges, 3, 3] gather.
        """
        if batch.n_systems == 1:
            return batch.unit_shifts @ cell[0]
        starts = [0, *np.cumsum(batch.n_atoms).tolist()]
        bounds = torch.searchsorted(
            batch.receivers, torch.tensor(starts, device=batch.receivers.device)
        ).tolist()
        return torch.cat(
            [batch.unit_shifts[bounds[b] : bounds[b + 1]] @ cell[b] for b in range(batch.n_systems)]
        )

    @property
    def ewald_charge_key(self) -> str:
        assert self.config.ewald is not None
        return self.config.ewald.charge_readout

    def predict(
        self,
        structures: Sequence[Structure | PreparedStructure],
        *,
        forces: bool = True,
        stress: bool = True,
    ) -> list[Prediction]:
        """Energies (and forces, virial, stress) of several structures.

        Structures are independent, so they are evaluated in groups of up to
        ``group_atoms`` atoms, one forward and backward pass per group: one group
        for a typical batch on a GPU; on a CPU, where big tensors only fall out of
        cache, groups of a few thousand atoms are faster than one pass.
        """
        prepared = [s if isinstance(s, PreparedStructure) else self.prepare(s) for s in structures]
        results: list[Prediction] = []
        for group in self._groups(prepared):
            batch = collate(group, self.device)
            with torch.enable_grad():
                out = self.compute(batch, forces=forces, virial=stress)
            results.extend(self._to_predictions(group, out))
        return results

    @property
    def group_atoms(self) -> int:
        """Most atoms evaluated in one pass by :meth:`predict` (a bigger structure runs alone)."""
        if self._group_atoms is not None:
            return self._group_atoms
        # CPU: measured on 32 x 192-atom water, groups of 384-768 atoms were fastest
        # (one 6,144-atom pass took 2.5x longer); a GPU wants everything at once.
        return 512 if self.device.type == "cpu" else 1 << 20

    @group_atoms.setter
    def group_atoms(self, value: int | None) -> None:
        self._group_atoms = value

    def _groups(self, prepared: Sequence[PreparedStructure]) -> list[list[PreparedStructure]]:
        limit = self.group_atoms
        groups: list[list[PreparedStructure]] = []
        size = limit  # forces a new group for the first structure
        for p in prepared:
            if size + p.n_atoms > limit:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.n_atoms
        return groups

    def _to_predictions(
        self, prepared: Sequence[PreparedStructure], out: BatchOutput
    ) -> list[Prediction]:
        def np64(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        energy = np64(out.energy)
        forces = np64(out.forces) if out.forces is not None else None
        virial = np64(out.virial) if out.virial is not None else None
        atom_energy = np64(out.atom_energy)
        charges = np64(out.charges) if out.charges is not None else None
        results = []
        start = 0
        for b, p in enumerate(prepared):
            n = p.n_atoms
            sl = slice(start, start + n)
            start += n
            pred = Prediction(energy=float(energy[b]))
            if forces is not None:
                pred.forces = forces[sl]
            if virial is not None:
                pred.virial = virial[b]
                volume = p.structure.volume
                if p.structure.is_periodic and volume > 1e-8:
                    pred.stress = -virial[b] / volume
            if self.ewald is None:
                pred.energies = atom_energy[sl]
            if charges is not None:
                pred.charges = charges[sl]
            results.append(pred)
        return results
