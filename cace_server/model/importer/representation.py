"""The CACE representation (``cace.representations.cace_representation.Cace``).

Reads every hyper-parameter and weight of the original representation into our
config fields and parameter names. The original indexes its element embeddings by
the position of an element in its ``zs`` list, which need not be sorted (e.g.
[8, 82, 22]); ours are sorted, so the embedding rows are permuted to match.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.config import MessagePassingConfig
from cace_server.model.importer.legacy import check_angular_tables
from cace_server.model.importer.registry import reads
from cace_server.model.importer.tree import attr, children, params, read_mlp, require, sub

reads(
    ("cace.representations.cace_representation", "Cace"),
    ("cace.modules.type", "NodeEncoder"),
    ("cace.modules.type", "NodeEmbedding"),
    ("cace.modules.type", "EdgeEncoder"),
    ("cace.modules.radial", "BesselRBF"),
    ("cace.modules.cutoff", "PolynomialCutoff"),
    ("cace.modules.radial_transform", "SharedRadialLinearTransform"),
    ("cace.modules.interaction", "NodeMemory"),
    ("cace.modules.interaction", "MessageAr"),
    ("cace.modules.interaction", "MessageBchi"),
)


def read_representation(rep: PickledObject, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ModelConfig fields of the representation; its weights go into ``state``."""
    require(rep, "Cace")
    d = rep.__dict__
    if attr(rep, "charge_spin_key") is not None:
        raise UnsupportedCheckpointError(
            "charge/spin embeddings (charge_spin_key) are not supported"
        )
    # ``forward_features`` copies input keys (e.g. 'charge_states') into the
    # representation's output dictionary; heads that read one next to the node
    # features (Atomwise with a list feature_key) get it from ``Structure.arrays``.
    require(sub(rep, "node_onehot"), "NodeEncoder")
    edge = sub(rep, "edge_coding")
    require(edge, "EdgeEncoder")
    if not attr(edge, "directed", True):
        raise UnsupportedCheckpointError("undirected edge encoding is not supported")

    zs = [int(z) for z in d["zs"]]
    if len(set(zs)) != len(zs):
        raise UnsupportedCheckpointError(f"element list {zs} has duplicates")
    order = sorted(range(len(zs)), key=lambda k: zs[k])
    elements = [zs[k] for k in order]
    permutation = torch.tensor(order, dtype=torch.long)

    sender = sub(rep, "node_embedding_sender")
    receiver = sub(rep, "node_embedding_receiver")
    state["representation.sender_embedding"] = sub(sender, "embedding_weights")[permutation]
    embed_receiver = receiver is not sender
    if embed_receiver:
        state["representation.receiver_embedding"] = sub(receiver, "embedding_weights")[permutation]

    # Every constant is taken as the original stores it and evaluates it:
    # - the neighbour-list radius: ``Cace.cutoff``, a Python float (e.g. 5.29);
    # - Bessel frequencies and prefactor: BesselRBF's parameter/buffer, in the
    #   checkpoint's precision (float32: sqrt(2/5.29) rounded to float32);
    # - the envelope's radius and exponent: PolynomialCutoff's buffers, float32 in
    #   every published file, so 5.29 is 5.289999961853027 there (and in the
    #   original's float64 run, which converts the stored value); BesselRBF.cutoff
    #   is stored too but its forward never reads it;
    # - the message normalisation: ``Cace.mp_norm_factor``, a Python float.
    rbf = sub(rep, "radial_basis")
    require(rbf, "BesselRBF")
    freqs = sub(rbf, "bessel_weights")
    trainable_rbf = "bessel_weights" in (rbf.__dict__.get("_parameters") or {})
    state["representation.radial_basis.frequencies"] = freqs
    prefactor = sub(rbf, "prefactor")
    state["representation.radial_basis.prefactor"] = torch.as_tensor(prefactor)
    cutoff = float(d["cutoff"])
    if abs(float(sub(rbf, "cutoff")) - cutoff) > 1e-6:
        raise UnsupportedCheckpointError("radial basis cutoff differs from the model cutoff")
    if not math.isclose(float(prefactor), math.sqrt(2.0 / cutoff), rel_tol=1e-6):
        raise UnsupportedCheckpointError("unexpected Bessel prefactor")
    cut = sub(rep, "cutoff_fn")
    require(cut, "PolynomialCutoff")
    if abs(float(sub(cut, "cutoff")) - cutoff) > 1e-6:
        raise UnsupportedCheckpointError("cutoff function radius differs from the model cutoff")
    envelope = float(sub(cut, "cutoff"))
    p = float(sub(cut, "p"))
    if p != round(p):
        raise UnsupportedCheckpointError(f"non-integer polynomial cutoff exponent {p}")

    max_l, max_nu = int(d["max_l"]), int(d["max_nu"])
    tables = check_angular_tables(rep, max_l, max_nu)
    mixing = sub(sub(rep, "radial_transform"), "weights")
    state["representation.radial_mixing"] = torch.stack(params(mixing))

    mp_cfg = read_message_passing(rep, state)
    return dict(
        elements=elements,
        cutoff=cutoff,
        n_atom_basis=int(d["n_atom_basis"]),
        embed_receiver=embed_receiver,
        n_rbf=int(freqs.shape[0]),
        trainable_rbf=trainable_rbf,
        n_radial=int(state["representation.radial_mixing"].shape[2]),
        cutoff_p=round(p),
        envelope_cutoff=None if envelope == cutoff else envelope,
        max_l=max_l,
        max_nu=max_nu,
        num_message_passing=int(d["num_message_passing"]),
        avg_num_neighbors=1.0 / float(d["mp_norm_factor"]) ** 2,
        mp_norm_factor=float(d["mp_norm_factor"]),
        message_passing=mp_cfg,
        **tables,
    )


def read_message_passing(
    rep: PickledObject, state: dict[str, torch.Tensor]
) -> MessagePassingConfig:
    mp_cfg = MessagePassingConfig()
    kinds: set[tuple[bool, bool, bool]] = set()
    for t, layer in enumerate(children(sub(rep, "message_passing_list"))):
        memory, ar, bchi = (layer.__dict__["_modules"].get(str(k)) for k in range(3))
        kinds.add((memory is not None, ar is not None, bchi is not None))
        mp_cfg.memory, mp_cfg.radial, mp_cfg.bchi = (
            memory is not None,
            ar is not None,
            bchi is not None,
        )
        prefix = f"representation.layers.{t}"
        if memory is not None:
            require(memory, "NodeMemory")
            state[f"{prefix}.memory"] = torch.stack(params(sub(memory, "memory_coef")))
        if ar is not None:
            require(ar, "MessageAr")
            state[f"{prefix}.ar_amplitude"] = torch.stack(params(sub(ar, "prefactor")))
            state[f"{prefix}.ar_inverse_range"] = torch.stack(params(sub(ar, "invr0")))
        if bchi is not None:
            require(bchi, "MessageBchi")
            if attr(bchi, "residual") or attr(bchi, "use_batchnorm"):
                raise UnsupportedCheckpointError(
                    "residual/batch-norm B-chi networks are not supported"
                )
            sizes, act, _ = read_mlp(sub(bchi, "hnet"), f"{prefix}.bchi", state)
            mp_cfg.bchi_hidden = sizes[:-1]
            mp_cfg.bchi_activation = act
            mp_cfg.bchi_shared_channels = bool(attr(bchi, "shared_channels", True))
            mp_cfg.bchi_shared_l = bool(attr(bchi, "shared_l", True))
    if len(kinds) > 1:
        raise UnsupportedCheckpointError("layers with different message kinds are not supported")
    return mp_cfg
