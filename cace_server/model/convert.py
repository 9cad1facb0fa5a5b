"""Convert a checkpoint of the original CACE package into a :class:`CACEPotential`.

The checkpoint is read by :mod:`cace_server.model.checkpoint` (no pickle code runs);
this module maps the recorded attributes of the original module tree onto our
config and parameter names, and refuses any feature it cannot reproduce exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cace_server.model.angular import cartesian_components, symmetrizer_terms
from cace_server.model.checkpoint import (
    Activation,
    PickledObject,
    UnsupportedCheckpointError,
    read_original_checkpoint,
)
from cace_server.model.config import (
    EwaldConfig,
    MessagePassingConfig,
    ModelConfig,
    ReadoutConfig,
)
from cace_server.model.potential import CACEPotential


def _sub(obj: PickledObject, name: str) -> Any:
    for store in ("_modules", "_parameters", "_buffers"):
        table = obj.__dict__.get(store) or {}
        if name in table:
            return table[name]
    if name in obj.__dict__:
        return obj.__dict__[name]
    raise UnsupportedCheckpointError(f"{obj.__class_path__} has no attribute {name!r}")


def _children(obj: PickledObject) -> list[Any]:
    return list((obj.__dict__.get("_modules") or {}).values())


def _params(obj: PickledObject) -> list[torch.Tensor]:
    return list((obj.__dict__.get("_parameters") or {}).values())


def _require(obj: PickledObject, expected: str) -> None:
    if not isinstance(obj, PickledObject) or obj.class_name != expected:
        found = obj.__class_path__ if isinstance(obj, PickledObject) else type(obj).__name__
        raise UnsupportedCheckpointError(f"expected a {expected}, found {found}")


def _is_activation(obj: Any) -> str:
    if isinstance(obj, Activation):
        return obj.name
    if obj is None or (isinstance(obj, PickledObject) and obj.class_name == "Identity"):
        return "identity"
    raise UnsupportedCheckpointError(f"unsupported activation {obj!r}")


def _read_mlp(
    seq: PickledObject, prefix: str, state: dict[str, torch.Tensor]
) -> tuple[list[int], str, bool]:
    """Dense layers of a Sequential -> (output sizes, hidden activation, bias)."""
    _require(seq, "Sequential")
    sizes: list[int] = []
    activations: list[str] = []
    bias = True
    for k, dense in enumerate(_children(seq)):
        _require(dense, "Dense")
        if dense.__dict__.get("use_batchnorm"):
            raise UnsupportedCheckpointError("batch normalisation in an MLP is not supported")
        linear = _sub(dense, "linear")
        _require(linear, "Linear")
        weight = _sub(linear, "weight")
        b = _sub(linear, "bias")
        state[f"{prefix}.layers.{k}.weight"] = weight
        if b is not None:
            state[f"{prefix}.layers.{k}.bias"] = b
        bias = b is not None
        sizes.append(int(weight.shape[0]))
        act = (dense.__dict__.get("_modules") or {}).get(
            "activation", dense.__dict__.get("activation")
        )
        activations.append(_is_activation(act))
    if activations[-1] != "identity":
        raise UnsupportedCheckpointError("the last layer of an MLP must be linear")
    hidden_acts = set(activations[:-1])
    if len(hidden_acts) > 1:
        raise UnsupportedCheckpointError(f"mixed activations {hidden_acts} are not supported")
    return sizes, hidden_acts.pop() if hidden_acts else "silu", bias


def _check_tables(rep: PickledObject, max_l: int, max_nu: int) -> None:
    """The angular component order and symmetriser terms must equal ours."""
    angular = _sub(rep, "angular_basis")
    _require(angular, "AngularComponent")
    stored = [tuple(c) for c in angular.__dict__["lxlylz_list"]]
    if stored != cartesian_components(max_l):
        raise UnsupportedCheckpointError("angular component order differs from ours")
    sym = _sub(rep, "symmetrizer")
    _require(sym, "Symmetrizer")
    tables = sym.__dict__.get("vec_dict_allnu", {})
    for nu in range(2, max_nu + 1):
        ours: dict[Any, list[Any]] = {}
        for t in symmetrizer_terms(max_l, nu):
            ours.setdefault(t.key if nu > 2 else t.key[0], []).append(
                ([list(c) for c in t.components], t.prefactor)
            )
        theirs = tables.get(nu, {})
        if list(theirs) != list(ours):
            raise UnsupportedCheckpointError(f"symmetriser invariants for nu={nu} differ from ours")
        for key, items in theirs.items():
            got = sorted((str([list(c) for c in item[:-1]]), int(item[-1])) for item in items)
            want = sorted((str(c), p) for c, p in ours[key])
            if got != want:
                raise UnsupportedCheckpointError(f"symmetriser terms of {key} differ from ours")


def convert_checkpoint(
    root: PickledObject, source: str = ""
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    _require(root, "NeuralNetworkPotential")
    if _children(_sub(root, "postprocessors")):
        raise UnsupportedCheckpointError("post-processors are not supported")
    rep = _sub(root, "representation")
    _require(rep, "Cace")
    d = rep.__dict__
    if d.get("charge_spin_key") is not None:
        raise UnsupportedCheckpointError("charge/spin embeddings are not supported")
    _require(_sub(rep, "node_onehot"), "NodeEncoder")
    edge = _sub(rep, "edge_coding")
    _require(edge, "EdgeEncoder")
    if not edge.__dict__.get("directed", True):
        raise UnsupportedCheckpointError("undirected edge encoding is not supported")
    state: dict[str, torch.Tensor] = {}

    elements = [int(z) for z in d["zs"]]
    if sorted(elements) != elements:
        raise UnsupportedCheckpointError("element list must be sorted")
    sender = _sub(rep, "node_embedding_sender")
    receiver = _sub(rep, "node_embedding_receiver")
    state["representation.sender_embedding"] = _sub(sender, "embedding_weights")
    embed_receiver = receiver is not sender
    if embed_receiver:
        state["representation.receiver_embedding"] = _sub(receiver, "embedding_weights")

    rbf = _sub(rep, "radial_basis")
    _require(rbf, "BesselRBF")
    freqs = _sub(rbf, "bessel_weights")
    trainable_rbf = "bessel_weights" in (rbf.__dict__.get("_parameters") or {})
    state["representation.radial_basis.frequencies"] = freqs
    state["representation.radial_basis.prefactor"] = _sub(rbf, "prefactor")
    cutoff = float(d["cutoff"])
    if abs(float(_sub(rbf, "cutoff")) - cutoff) > 1e-6:
        raise UnsupportedCheckpointError("radial basis cutoff differs from the model cutoff")
    cut = _sub(rep, "cutoff_fn")
    _require(cut, "PolynomialCutoff")
    if abs(float(_sub(cut, "cutoff")) - cutoff) > 1e-6:
        raise UnsupportedCheckpointError("cutoff function radius differs from the model cutoff")

    max_l, max_nu = int(d["max_l"]), int(d["max_nu"])
    _check_tables(rep, max_l, max_nu)
    mixing = _sub(_sub(rep, "radial_transform"), "weights")
    state["representation.radial_mixing"] = torch.stack(_params(mixing))

    n_mp = int(d["num_message_passing"])
    mp_cfg = MessagePassingConfig()
    for t, layer in enumerate(_children(_sub(rep, "message_passing_list"))):
        memory, ar, bchi = (layer.__dict__["_modules"].get(str(k)) for k in range(3))
        mp_cfg.memory, mp_cfg.radial, mp_cfg.bchi = (
            memory is not None,
            ar is not None,
            bchi is not None,
        )
        prefix = f"representation.layers.{t}"
        if memory is not None:
            _require(memory, "NodeMemory")
            state[f"{prefix}.memory"] = torch.stack(_params(_sub(memory, "memory_coef")))
        if ar is not None:
            _require(ar, "MessageAr")
            state[f"{prefix}.ar_amplitude"] = torch.stack(_params(_sub(ar, "prefactor")))
            state[f"{prefix}.ar_inverse_range"] = torch.stack(_params(_sub(ar, "invr0")))
        if bchi is not None:
            _require(bchi, "MessageBchi")
            bd = bchi.__dict__
            if bd.get("residual") or bd.get("use_batchnorm"):
                raise UnsupportedCheckpointError(
                    "residual/batch-norm B-chi networks are not supported"
                )
            sizes, act, _ = _read_mlp(_sub(bchi, "hnet"), f"{prefix}.bchi", state)
            mp_cfg.bchi_hidden = sizes[:-1]
            mp_cfg.bchi_activation = act
            mp_cfg.bchi_shared_channels = bool(bd.get("shared_channels", True))
            mp_cfg.bchi_shared_l = bool(bd.get("shared_l", True))

    outputs = _children(_sub(root, "output_modules"))
    atomwise = [m for m in outputs if m.class_name == "Atomwise"]
    ewalds = [m for m in outputs if m.class_name == "EwaldPotential"]
    adds = {m.__dict__["output_key"]: m for m in outputs if m.class_name == "FeatureAdd"}
    forces = [m for m in outputs if m.class_name == "Forces"]
    for m in outputs:
        if m.class_name not in ("Atomwise", "EwaldPotential", "FeatureAdd", "Forces"):
            raise UnsupportedCheckpointError(f"output module {m.__class_path__} is not supported")
    if len(forces) != 1:
        raise UnsupportedCheckpointError("expected exactly one Forces output module")
    energy_key = forces[0].__dict__["energy_key"]
    energy_terms = adds[energy_key].__dict__["feature_keys"] if energy_key in adds else [energy_key]

    ewald_cfg = None
    if len(ewalds) > 1:
        raise UnsupportedCheckpointError("more than one Ewald term is not supported")
    charge_keys = set()
    for ew in ewalds:
        e = ew.__dict__
        if e.get("external_field") is not None or e.get("charge_neutral_lambda") is not None:
            raise UnsupportedCheckpointError(
                "external fields / charge-neutrality terms are not supported"
            )
        if int(e.get("exponent", 1)) != 1:
            raise UnsupportedCheckpointError("only Coulomb (exponent 1) Ewald terms are supported")
        if e["output_key"] not in energy_terms:
            raise UnsupportedCheckpointError("an Ewald term that is not part of the energy")
        ewald_cfg = EwaldConfig(
            charge_readout=e["feature_key"],
            dl=float(e["dl"]),
            sigma=float(e["sigma"]),
            exponent=1,
            remove_self_interaction=bool(e["remove_self_interaction"]),
            norm_factor=float(e.get("norm_factor", 1.0)),
        )
        charge_keys.add(e["feature_key"])

    readouts: list[ReadoutConfig] = []
    for m in atomwise:
        a = m.__dict__
        if a.get("residual") or a.get("use_batchnorm") or a.get("post_process") is not None:
            raise UnsupportedCheckpointError(
                "residual/batch-norm/post-processed readouts are not supported"
            )
        if a.get("aggregation_mode") != "sum" or int(a.get("n_out", 1)) != 1:
            raise UnsupportedCheckpointError("only summed scalar atom-wise readouts are supported")
        if a.get("feature_key", "node_feats") != "node_feats":
            raise UnsupportedCheckpointError("readouts must read the node features")
        if a["per_atom_output_key"] in charge_keys:
            name, kind = a["per_atom_output_key"], "charge"
        elif a["output_key"] in energy_terms:
            name, kind = a["output_key"], "energy"
        else:
            continue  # an output that does not enter the energy (e.g. a dipole head)
        prefix = f"readouts.{name}"
        sizes, act, bias = _read_mlp(_sub(m, "outnet"), f"{prefix}.mlp", state)
        linear_branch = bool(a.get("add_linear_nn"))
        if linear_branch:
            lin = _sub(_sub(m, "linear_nn"), "linear")
            state[f"{prefix}.linear.weight"] = _sub(lin, "weight")
            if _sub(lin, "bias") is not None:
                state[f"{prefix}.linear.bias"] = _sub(lin, "bias")
        readouts.append(ReadoutConfig(name, kind, sizes[:-1], act, bias, linear_branch))
    covered = {r.name for r in readouts if r.kind == "energy"} | {
        e.__dict__["output_key"] for e in ewalds
    }
    if set(energy_terms) != covered:
        raise UnsupportedCheckpointError(f"cannot reproduce energy terms {energy_terms}")

    mixing_shape = state["representation.radial_mixing"].shape
    dtype = state["representation.radial_mixing"].dtype
    config = ModelConfig(
        elements=elements,
        cutoff=cutoff,
        n_atom_basis=int(d["n_atom_basis"]),
        embed_receiver=embed_receiver,
        n_rbf=int(freqs.shape[0]),
        trainable_rbf=trainable_rbf,
        n_radial=int(mixing_shape[2]),
        cutoff_p=round(float(_sub(cut, "p"))),
        max_l=max_l,
        max_nu=max_nu,
        num_message_passing=n_mp,
        avg_num_neighbors=1.0 / float(d["mp_norm_factor"]) ** 2,
        message_passing=mp_cfg,
        readouts=readouts,
        ewald=ewald_cfg,
        dtype="float64" if dtype == torch.float64 else "float32",
        source=source,
    )
    if not math.isclose(float(_sub(rbf, "prefactor")), math.sqrt(2.0 / cutoff), rel_tol=1e-6):
        raise UnsupportedCheckpointError("unexpected Bessel prefactor")
    return config, state


def convert_original(
    path: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> CACEPotential:
    """Read an original CACE checkpoint and return our equivalent model."""
    root = read_original_checkpoint(path)
    config, state = convert_checkpoint(root, source=f"converted from {Path(path).name}")
    with torch.device("cpu"):
        model = CACEPotential(config)
    model = model.to(dtype=state["representation.radial_mixing"].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "atomic_energies"]
    if missing or unexpected:
        raise UnsupportedCheckpointError(
            f"checkpoint does not map onto the model: missing {missing}, unexpected {unexpected}"
        )
    return finalize(model, dtype=dtype, device=device)


def finalize(
    model: CACEPotential, *, dtype: str | torch.dtype | None, device: str | torch.device
) -> CACEPotential:
    """Move to dtype/device, switch to inference mode, freeze parameters."""
    if dtype is not None:
        model = model.to(dtype=_torch_dtype(dtype))
    model = model.to(device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in table:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return table[dtype]
