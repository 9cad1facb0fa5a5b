"""CACEPotential: energy, forces and virial/stress of batches of structures.

Pure computation: structures in, predictions out. No I/O, threads or servers.
Geometry (positions, cell, strain, edge vectors) is kept in float64 whatever the
model's dtype; the network runs in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cace_server.model.compiled import CompiledCall
from cace_server.model.config import ModelConfig
from cace_server.model.dipole import DipoleOutput, PolarizationHead
from cace_server.model.longrange import EwaldSum, LongRangeOptions
from cace_server.model.mlp import AtomwiseReadout
from cace_server.model.neighbors import (
    GraphBatch,
    PreparedStructure,
    VerletList,
    collate,
    prepare_structure,
)
from cace_server.model.representation import CACERepresentation
from cace_server.outputs import Outputs
from cace_server.structures import BatchCost, Prediction, Structure


@dataclass
class BatchOutput:
    """Tensors of one evaluation (before conversion to numpy)."""

    energy: torch.Tensor  # [B] float64
    atom_energy: torch.Tensor  # [N] short-range + reference energies, model dtype
    charges: torch.Tensor | None  # [N] or [N, n_q], latent units
    forces: torch.Tensor | None  # [N, 3]
    virial: torch.Tensor | None  # [B, 3, 3] = -dE/d(strain)
    descriptors: torch.Tensor | None = None  # [N, features]: the heads' input
    dipole: torch.Tensor | None = None  # [B, 3] e·Å
    bec: torch.Tensor | None = None  # [N, 3, 3], [i, a, b] = d dipole_b / d r_ia


def to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors as float64 numpy arrays, in one device-to-host copy."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors.values()])
    host = flat.to("cpu").numpy()
    arrays: dict[str, np.ndarray] = {}
    start = 0
    for key, value in tensors.items():
        arrays[key] = host[start : start + value.numel()].reshape(value.shape)
        start += value.numel()
    return arrays


@dataclass
class Geometry:
    """The differentiable geometry of one evaluation (float64).

    ``positions`` and ``strain`` are the leaves forces and virials are taken
    against (``strain`` None without a virial); ``deformed`` and ``cell`` are the
    strained positions and cells, ``vectors`` each edge's receiver minus sender.
    """

    positions: torch.Tensor
    strain: torch.Tensor | None
    deformed: torch.Tensor
    cell: torch.Tensor
    vectors: torch.Tensor

    @classmethod
    def of(
        cls, batch: GraphBatch, *, forces: bool, virial: bool, pad_length: float = 0.0
    ) -> Geometry:
        """``pad_length``: the length of the padding slots' vectors (beyond the cutoff)
        of a batch in the [receiver, slot] layout."""
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
            - _images(batch, cell)
        )
        if batch.slot_mask is not None:
            # A padding slot gets a constant vector beyond the cutoff: zero radial
            # weight, and no gradient back to the (arbitrary) atoms it names.
            pad = torch.zeros(3, dtype=vectors.dtype, device=vectors.device)
            pad[0] = pad_length
            vectors = torch.where(batch.slot_mask[:, None], vectors, pad)
        return cls(positions, strain, deformed, cell, vectors)

    @property
    def leaves(self) -> list[torch.Tensor]:
        """What gradients are taken against: positions (when they require it), strain."""
        out = [self.positions] if self.positions.requires_grad else []
        return out + ([self.strain] if self.strain is not None else [])


def _images(batch: GraphBatch, cell: torch.Tensor) -> torch.Tensor:
    """Cartesian image shift of each edge's sender: unit_shifts @ cell of its system.

    One gather of each edge's cell (the edge's system is known from the host at
    collation), so the op count does not grow with the number of structures and
    nothing waits for the device.
    """
    if batch.n_systems == 1:
        return batch.unit_shifts @ cell[0]
    per_edge = cell.index_select(0, batch.edge_system)  # [E, 3, 3]
    return torch.einsum("ei,eij->ej", batch.unit_shifts, per_edge)


class CACEPotential(torch.nn.Module):
    atomic_energies: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.representation = CACERepresentation(config)
        n_in = self.representation.n_features
        self.readouts = torch.nn.ModuleDict(
            {
                r.name: AtomwiseReadout(
                    n_in + sum(r.inputs.values()),
                    r.hidden,
                    r.activation,
                    r.bias,
                    r.linear_branch,
                    r.n_out,
                    r.scale,
                )
                for r in config.readouts
            }
        )
        # Energy heads and their coefficients in the total energy.
        self.energy_readouts = {r.name: r.weight for r in config.readouts if r.kind == "energy"}
        # Heads that read per-atom inputs after the node features: name -> input names.
        self.readout_inputs = {r.name: list(r.inputs) for r in config.readouts if r.inputs}
        self.input_widths: dict[str, int] = {}
        for r in config.readouts:
            self.input_widths.update(r.inputs)
        self.ewald = EwaldSum(config.ewald) if config.ewald is not None else None
        self.polarization = (
            PolarizationHead(config.polarization) if config.polarization is not None else None
        )
        self._group_atoms: int | None = None
        # The compiled call (model/compiled.py), when the model was compiled.
        self.compiled: CompiledCall | None = None
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
        return self.charge_readout is not None

    @property
    def charge_readout(self) -> str | None:
        """The head whose latent charges the model reports (long range, else dipole)."""
        if self.config.ewald is not None:
            return self.config.ewald.charge_readout
        if self.config.polarization is not None:
            return self.config.polarization.charge_readout
        return None

    @property
    def charge_unit(self) -> float:
        """Latent charge units per elementary charge of the reported charges."""
        if self.config.ewald is not None:
            return float(self.config.ewald.charge_unit)
        return 9.48933

    @property
    def has_bec(self) -> bool:
        return self.polarization is not None and self.polarization.bec

    @property
    def has_energy(self) -> bool:
        return bool(self.energy_readouts) or self.ewald is not None

    @property
    def outputs(self) -> tuple[str, ...]:
        """What :meth:`predict` can return for this model."""
        if not self.has_energy:
            return ("descriptors",)
        names = ["energy", "forces", "stress", "descriptors"]
        if self.ewald is None:
            names.append("energies")
        if self.has_charges:
            names.append("charges")
        if self.polarization is not None:
            names.append("dipole")
        if self.has_bec:
            names.append("bec")
        return tuple(names)

    @property
    def default_outputs(self) -> Outputs:
        """What :meth:`predict` returns when not told: what comes with the energy pass."""
        return Outputs.default_for(self.outputs)

    def batch_cost(self, prepared: PreparedStructure) -> BatchCost:
        """What one structure adds to a batch: its atoms and neighbour pairs.

        Memory and time of a pass grow with both (node features with atoms, the edge
        basis and messages with pairs); the engine bounds batches by each.
        """
        return BatchCost(prepared.n_atoms, prepared.n_pairs)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        """Per-atom input arrays (``Structure.arrays``) the energy heads read."""
        return tuple(self.input_widths)

    def describe(self) -> dict[str, object]:
        """What the model offers, for `cace-server info` and GET /v1/models."""
        c = self.config
        long_range = None
        if c.ewald is not None:
            long_range = {
                "kind": "ewald",
                "charges": c.ewald.charge_readout,
                "charge_channels": next(
                    r.n_out for r in c.readouts if r.name == c.ewald.charge_readout
                ),
                "weight": c.ewald.weight,
                "norm_factor": c.ewald.norm_factor,
                "charge_unit": c.ewald.charge_unit,
                "sigma": c.ewald.sigma,
                "dl": c.ewald.dl,
            }
        return {
            "family": list(c.family) or ["cace"],
            "outputs": list(self.outputs),
            "required_inputs": list(self.required_inputs),
            "long_range": long_range,
            "elements": list(c.elements),
            "cutoff": c.cutoff,
            "message_passing_layers": c.num_message_passing,
            "max_l": c.max_l,
            "max_nu": c.max_nu,
            "energy_heads": dict(self.energy_readouts),
            "compiled": self.compiled.mode if self.compiled is not None else None,
        }

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- evaluation --------------------------------------------------------------------------
    def prepare(self, structure: Structure) -> PreparedStructure:
        """Validate a structure and build its neighbour list (on a CUDA model's device)."""
        return prepare_structure(structure, self.config.elements, self.cutoff, self._list_device)

    def verlet_list(self, skin: float) -> VerletList:
        """A reusable neighbour list for one evolving structure (see VerletList)."""
        return VerletList(self.config.elements, self.cutoff, skin, self._list_device)

    @property
    def _list_device(self) -> torch.device | None:
        """Where neighbour lists are built: a CUDA model's device; None: numpy on the CPU."""
        device = self.device
        return device if device.type == "cuda" else None

    def compute(
        self,
        batch: GraphBatch,
        *,
        forces: bool = True,
        virial: bool = True,
        create_graph: bool = False,
        bec: bool = False,
        descriptors: bool = False,
    ) -> BatchOutput:
        """Evaluate a collated batch; ``create_graph`` keeps forces differentiable (training).

        ``bec`` also returns the Born effective charges of dipole models (three or six
        more backward passes).
        """
        bec = bec and self.has_bec
        geometry = Geometry.of(
            batch, forces=forces or bec, virial=virial, pad_length=2.0 * self.cutoff
        )
        positions, strain, deformed, cell = (
            geometry.positions,
            geometry.strain,
            geometry.deformed,
            geometry.cell,
        )
        slotted = batch.slots is not None
        features = self.representation(
            geometry.vectors.to(self.dtype),
            batch.species,
            None if slotted else batch.receivers,
            batch.senders,
            max_neighbors=batch.slots if slotted else batch.max_neighbors,
        )
        energy, atom_energy = self.head_energies(features, batch)
        charge_key = self.charge_readout
        charges = self.readouts[charge_key](features) if charge_key is not None else None
        if charges is not None and batch.atom_mask is not None:
            # The padding atoms of a compiled call carry no charge (the Ewald plan
            # names only real atoms; the polarization sums every atom of a system).
            mask = batch.atom_mask.to(charges.dtype)
            charges = charges * (mask if charges.dim() == 1 else mask[:, None])
        if self.ewald is not None and charges is not None:
            energy = energy + self._long_range(deformed, charges, cell, batch).to(torch.float64)
        dipole = None
        if self.polarization is not None and charges is not None:
            dipole = self.polarization(
                deformed, charges, cell, batch.pbc, batch.system, batch.n_systems
            )

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
                energy.sum(),
                inputs,
                create_graph=create_graph,
                retain_graph=create_graph or bec,
                allow_unused=True,
            )
            k = 0
            if forces:
                g = grads[k]
                force_out = -g if g is not None else torch.zeros_like(positions)
                k += 1
            if virial:
                g = grads[k]
                virial_out = -g if g is not None else torch.zeros_like(batch.cell)
        bec_out = self._born_charges(dipole, positions) if bec and dipole is not None else None
        return BatchOutput(
            energy,
            atom_energy,
            charges,
            force_out,
            virial_out,
            features if descriptors else None,
            dipole.real if dipole is not None else None,
            bec_out,
        )

    def head_energies(
        self, features: torch.Tensor, batch: GraphBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy [B] float64, atom energies [N]) of the energy heads and the
        reference energies (no long-range term)."""
        atom_energy = self.atomic_energies.to(self.dtype)[batch.species]
        for name, weight in self.energy_readouts.items():
            head_input = features
            if name in self.readout_inputs:
                head_input = torch.cat(
                    [features, *(batch.inputs[k] for k in self.readout_inputs[name])], dim=1
                )
            contribution = self.readouts[name](head_input)
            atom_energy = atom_energy + (contribution if weight == 1.0 else weight * contribution)
        # Totals in float64 whatever the model dtype: a float32 sum of thousands of
        # per-atom energies with large reference energies loses whole eV.
        summed = atom_energy.to(torch.float64)
        if batch.atom_mask is not None:
            # The padding atoms of a compiled call add to no structure's energy.
            summed = summed * batch.atom_mask
        if batch.n_systems == 1:
            # (Inductor's CPU code generator fails on a scatter into one element.)
            return summed.sum().reshape(1), atom_energy
        energy = torch.zeros(
            batch.n_systems, dtype=torch.float64, device=atom_energy.device
        ).index_add(0, batch.system, summed)
        return energy, atom_energy

    def _long_range(
        self, positions: torch.Tensor, charges: torch.Tensor, cell: torch.Tensor, batch: GraphBatch
    ) -> torch.Tensor:
        """Weighted Ewald energy [B]; several charge channels add up, as in the original.

        The plan (back end and k-grid shapes of each structure) comes from the batch's
        host-side cells, so the call reads nothing back from the device.
        """
        assert self.ewald is not None and self.config.ewald is not None
        plan = None
        if batch.cell_host is not None and batch.pbc_host is not None:
            plan = self.ewald.plan(batch.cell_host, batch.pbc_host, batch.n_atoms)
        energy = self.ewald(positions, charges, cell, batch.pbc, batch.n_atoms, plan=plan)
        weight = self.config.ewald.weight
        return energy if weight == 1.0 else weight * energy

    @staticmethod
    def _born_charges(dipole: DipoleOutput, positions: torch.Tensor) -> torch.Tensor:
        """Z[i, a, b] = d dipole_b / d r_ia, dephased by each atom's phase in periodic cells.

        The original differentiates the complex polarization P and forms
        Re(dP_b/dr_ia * conj(exp(i phase_ib))) = dRe(P_b)/dr_ia cos + dIm(P_b)/dr_ia sin.
        """
        cos, sin = torch.cos(dipole.phase), torch.sin(dipole.phase)  # [N, 3]
        periodic = bool(dipole.imag.requires_grad)
        columns = []
        for b in range(3):
            last = b == 2
            d_re = torch.autograd.grad(
                dipole.real[:, b].sum(), positions, retain_graph=True, allow_unused=True
            )[0]
            d_re = torch.zeros_like(positions) if d_re is None else d_re
            column = d_re * cos[:, b : b + 1]
            if periodic:
                d_im = torch.autograd.grad(
                    dipole.imag[:, b].sum(), positions, retain_graph=not last, allow_unused=True
                )[0]
                if d_im is not None:
                    column = column + d_im * sin[:, b : b + 1]
            columns.append(column)
        return torch.stack(columns, dim=2)

    def configure_long_range(self, options: LongRangeOptions | None = None, **changes: Any) -> None:
        """Choose how the long-range term is evaluated (mode, back end); no-op without one.

        ``changes`` update the current options, e.g. ``configure_long_range(mode="smooth")``.
        """
        if self.ewald is None:
            return
        base = options if options is not None else self.ewald.options
        self.ewald.configure(base.updated(**changes))

    def predict(
        self,
        structures: Sequence[Structure | PreparedStructure],
        outputs: Iterable[str] | None = None,
    ) -> list[Prediction]:
        """Energies and the ``outputs`` asked for (an :class:`Outputs` or names).

        ``None`` asks for every output the model offers that comes with the energy
        pass (energy, forces, stress, per-atom energies, latent charges, dipole);
        Born effective charges (three or six more backward passes) and descriptors
        only when named. An output the model does not offer is refused
        (:class:`OutputNotOffered`). Each prediction holds exactly what was asked.

        Structures are independent, so they are evaluated in groups of up to
        ``group_atoms`` atoms, one forward and backward pass per group: one group
        for a typical batch on a GPU; on a CPU, where big tensors only fall out of
        cache, groups of a few thousand atoms are faster than one pass.
        """
        chosen = self.default_outputs if outputs is None else Outputs(outputs)
        chosen.require(self.outputs)
        prepared = [s if isinstance(s, PreparedStructure) else self.prepare(s) for s in structures]
        results: list[Prediction] = []
        for group in self._groups(prepared):
            batch = collate(group, self.device, self.input_widths, self.dtype)
            flags = {
                "forces": "forces" in chosen,
                "virial": "stress" in chosen,
                "bec": "bec" in chosen,
                "descriptors": "descriptors" in chosen,
            }
            if self.compiled is not None:
                out = self.compiled(batch, **flags)
            else:
                with torch.enable_grad():
                    out = self.compute(batch, **flags)
            results.extend(p.keep_only(chosen) for p in self._to_predictions(group, out))
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
        # Every output in one float64 buffer: one device-to-host copy per pass.
        parts = {
            "energy": out.energy,
            "forces": out.forces,
            "virial": out.virial,
            "atom_energy": out.atom_energy,
            "charges": out.charges,
            "dipole": out.dipole,
            "bec": out.bec,
            "descriptors": out.descriptors,
        }
        arrays = to_host({k: v for k, v in parts.items() if v is not None})
        energy = arrays["energy"]
        forces = arrays.get("forces")
        virial = arrays.get("virial")
        atom_energy = arrays["atom_energy"]
        charges = arrays["charges"] / self.charge_unit if "charges" in arrays else None
        dipole = arrays.get("dipole")
        bec = arrays.get("bec")
        descriptors = arrays.get("descriptors")
        results = []
        start = 0
        for b, p in enumerate(prepared):
            n = p.n_atoms
            sl = slice(start, start + n)
            start += n
            pred = Prediction(energy=float(energy[b]) if self.has_energy else math.nan)
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
            if dipole is not None:
                pred.dipole = dipole[b]
            if bec is not None:
                pred.bec = bec[sl]
            if descriptors is not None:
                pred.descriptors = descriptors[sl]
            results.append(pred)
        return results
