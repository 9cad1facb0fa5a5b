"""Hyper-parameters of a CACE model, as plain JSON-serialisable dataclasses.

The config plus the weights fully define a model: it is what our native model files
store next to the safetensors weights, and what the importer of original
checkpoints produces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_NAME = "cace-server-model"
FORMAT_VERSION = 2

ACTIVATIONS = ("silu", "relu", "tanh", "sigmoid", "identity")


@dataclass
class ReadoutConfig:
    """An atom-wise MLP on the node features (Cheng 2024, eq. 12 and SI).

    ``kind`` says what the per-atom output means: ``"energy"`` is summed into the
    total energy; ``"charge"`` is a latent charge fed to the long-range term.
    """

    name: str
    kind: str = "energy"
    hidden: list[int] = field(default_factory=lambda: [32, 16])
    activation: str = "silu"
    bias: bool = True
    linear_branch: bool = True
    # Outputs per atom: 1 for energies; latent charges may have several channels.
    n_out: int = 1
    # Factor applied to the head's output (the LES package scales its charges by 0.1).
    scale: float = 1.0
    # Energy heads: coefficient of this head in the total energy (CombinePotential weights).
    weight: float = 1.0
    # Per-atom inputs (``Structure.arrays``) concatenated after the node features, in
    # this order, with their widths: {"charge_states": 1} reads one column per atom.
    inputs: dict[str, int] = field(default_factory=dict)


@dataclass
class MessagePassingConfig:
    """Which message-passing terms each layer has (CACE paper, section 'message passing').

    ``memory``: the node keeps a learned fraction of its previous A features.
    ``radial``: neighbours' A features, damped by learned exponentials of distance.
    ``bchi``: edge basis weighted by an MLP of the sender's B features.
    """

    memory: bool = True
    radial: bool = True
    bchi: bool = True
    bchi_hidden: list[int] = field(default_factory=list)
    bchi_activation: str = "silu"
    bchi_shared_channels: bool = False
    bchi_shared_l: bool = False


@dataclass
class EwaldConfig:
    """Long-range electrostatics of latent charges (CACE-LR, Cheng 2025)."""

    charge_readout: str = "q"
    dl: float = 2.0
    sigma: float = 1.0
    exponent: int = 1
    remove_self_interaction: bool = False
    norm_factor: float = 1.0
    # Coefficient of the long-range energy in the total (CombinePotential weights).
    weight: float = 1.0
    # Open boundaries: the pair kernel is erf(r / (sigma sqrt 2)) / (r + pair_epsilon);
    # CACE's own Ewald uses 1e-6, the LES package none.
    pair_epsilon: float = 1e-6
    # Latent charge units per elementary charge: CACE's Ewald works with norm_factor 1
    # and charges scaled by sqrt(90.0474) = 9.48933; the LES package with charges in e
    # and norm_factor 90.0474 (e^2 / (2 eps0) in eV Å).
    charge_unit: float = 9.48933
    # CACE's periodic Ewald with several charge channels subtracts the self energy of
    # all channels from each channel (n_q times in all); the LES package once.
    self_energy_every_channel: bool = False


@dataclass
class PolarizationConfig:
    """Dipole (polarization) of the latent charges and its position derivative (BEC).

    The dipole is ``normalization * sum_i (q_i - <q>) r_i``; in a periodic cell, with
    ``periodic``, the original's Berry-phase form ``normalization * cell @ S / (2 pi i)``
    with ``S_b = sum_i (q_i - <q>) exp(2 pi i s_ib)`` (s: fractional coordinates), of
    which the real part is reported. The Born effective charges are the derivative of
    the dipole with respect to the positions (in a periodic cell: dephased by each
    atom's phase factor, as the original does).
    """

    charge_readout: str = "q"
    normalization: float = 1.0 / 9.48933
    remove_mean: bool = True
    periodic: bool = True
    bec: bool = True


@dataclass
class ModelConfig:
    elements: list[int]
    cutoff: float
    n_atom_basis: int = 3
    embed_receiver: bool = True
    n_rbf: int = 6
    trainable_rbf: bool = True
    n_radial: int = 12
    cutoff_p: int = 6
    # Radius of the polynomial envelope where it differs from ``cutoff`` (the neighbour
    # list's): the original stores the envelope's radius as a float32 buffer, so a
    # cutoff such as 5.29 is 5.289999961853027 in its envelope. None: ``cutoff``.
    envelope_cutoff: float | None = None
    max_l: int = 3
    max_nu: int = 3
    num_message_passing: int = 0
    avg_num_neighbors: float = 10.0
    # The message normalisation as the original stores it (1 / sqrt(avg_num_neighbors)
    # there); None: computed from ``avg_num_neighbors``.
    mp_norm_factor: float | None = None
    message_passing: MessagePassingConfig = field(default_factory=MessagePassingConfig)
    readouts: list[ReadoutConfig] = field(default_factory=lambda: [ReadoutConfig(name="energy")])
    ewald: EwaldConfig | None = None
    polarization: PolarizationConfig | None = None
    # Symmetriser invariants stored verbatim for models whose original formed other
    # invariants than ours ({nu: [[key, [components], prefactor], ...]}); empty: ours.
    symmetrizer_terms: dict[str, list[Any]] = field(default_factory=dict)
    atomic_energies: dict[int, float] = field(default_factory=dict)
    # Metadata that does not change the maths.
    dtype: str = "float64"
    units: dict[str, str] = field(default_factory=lambda: {"energy": "eV", "length": "Angstrom"})
    source: str = ""
    # Which original families the model was imported from (e.g. "cace", "combine", "les").
    family: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.elements:
            raise ValueError("a model needs at least one element")
        if sorted(set(self.elements)) != list(self.elements):
            raise ValueError("elements must be sorted and unique")
        if not 1 <= self.max_nu <= 4:
            raise ValueError(f"max_nu must be in 1..4, got {self.max_nu}")
        if self.max_l < 0:
            raise ValueError("max_l must be >= 0")
        for readout in self.readouts:
            if readout.kind not in ("energy", "charge"):
                raise ValueError(f"unknown readout kind {readout.kind!r}")
            if readout.n_out < 1 or (readout.kind == "energy" and readout.n_out != 1):
                raise ValueError(f"readout {readout.name!r}: energy heads have one output")
            if readout.activation not in ACTIVATIONS:
                raise ValueError(f"unknown activation {readout.activation!r}")
            if any(int(w) < 1 for w in readout.inputs.values()):
                raise ValueError(f"readout {readout.name!r}: per-atom inputs need a width >= 1")
            if readout.inputs and readout.kind != "energy":
                raise ValueError(f"readout {readout.name!r}: only energy heads read inputs")
        if self.ewald is not None:
            names = [r.name for r in self.readouts if r.kind == "charge"]
            if self.ewald.charge_readout not in names:
                raise ValueError(
                    f"ewald.charge_readout {self.ewald.charge_readout!r} is not a charge readout"
                )
            if self.ewald.exponent != 1:
                raise ValueError("only exponent 1 (Coulomb) is supported for the Ewald term")
        if self.polarization is not None:
            names = [r.name for r in self.readouts if r.kind == "charge"]
            if self.polarization.charge_readout not in names:
                raise ValueError(
                    f"polarization.charge_readout {self.polarization.charge_readout!r} "
                    "is not a charge readout"
                )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["atomic_energies"] = {str(k): v for k, v in self.atomic_energies.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        data["message_passing"] = MessagePassingConfig(**data.get("message_passing", {}))
        data["readouts"] = [ReadoutConfig(**r) for r in data.get("readouts", [])]
        if data.get("ewald") is not None:
            data["ewald"] = EwaldConfig(**data["ewald"])
        if data.get("polarization") is not None:
            data["polarization"] = PolarizationConfig(**data["polarization"])
        data["atomic_energies"] = {
            int(k): float(v) for k, v in data.get("atomic_energies", {}).items()
        }
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)
