"""Core CACE models: ``NeuralNetworkPotential`` with Atomwise heads, CACE's own Ewald
term (latent charges, CACE-LR), FeatureAdd sums and the Forces module."""

from __future__ import annotations

import math
from typing import Any

import torch

from cace_server.model.angular import Symmetrizer, explicit_terms
from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.config import EwaldConfig, ReadoutConfig
from cace_server.model.importer.assembly import Assembly, LinearCombination, ModelScope
from cace_server.model.importer.registry import (
    output_module_reader,
    reader_for,
    reads,
    root_reader,
)
from cace_server.model.importer.representation import read_representation
from cace_server.model.importer.tree import (
    attr,
    children,
    read_linear_branch,
    read_mlp,
    require,
    sub,
)

# Input modules: only the preprocessing step, which our neighbour list replaces.
reads(("cace.modules.preprocess", "Preprocess"))


def feature_key_is_node_features(module: PickledObject, name: str = "feature_key") -> None:
    key = attr(module, name, "node_feats")
    if key not in ("node_feats", ["node_feats"]):
        raise UnsupportedCheckpointError(
            f"{module.class_name} reads {key!r}; only heads on the node features are supported"
        )


def per_atom_inputs(module: PickledObject) -> list[str]:
    """The per-atom inputs an Atomwise head concatenates after the node features.

    A list ``feature_key`` (``['node_feats', 'charge_states']``) concatenates the
    named keys, each reshaped to [N, -1], in that order; the inputs after the node
    features come from the structure (the representation forwards them).
    """
    key = attr(module, "feature_key", "node_feats")
    keys = [key] if isinstance(key, str) or key is None else list(key)
    if not keys or keys[0] not in ("node_feats", None) or "node_feats" in keys[1:]:
        raise UnsupportedCheckpointError(
            f"{module.class_name} reads {key!r}; only heads on the node features, "
            "optionally followed by per-atom inputs, are supported"
        )
    if any(not isinstance(k, str) or not k for k in keys[1:]):
        raise UnsupportedCheckpointError(f"{module.class_name} reads unnamed inputs {key!r}")
    return [str(k) for k in keys[1:]]


def read_potential(nnp: PickledObject, assembly: Assembly) -> ModelScope:
    """Read the output modules of one NeuralNetworkPotential into ``assembly``."""
    require(nnp, "NeuralNetworkPotential")
    if children(sub(nnp, "postprocessors")) and attr(nnp, "do_postprocessing"):
        raise UnsupportedCheckpointError("post-processors are not supported")
    inputs = (nnp.__dict__.get("_modules") or {}).get("input_modules")
    for module in children(inputs) if inputs is not None else []:
        if module.class_name != "Preprocess":
            raise UnsupportedCheckpointError(
                f"input module {module.__class_path__} is not supported"
            )
    outputs = children(sub(nnp, "output_modules"))
    scope = ModelScope(assembly)
    for module in outputs:
        scope.charge_consumers.update(reader_for(module).charge_inputs(module))
    for module in outputs:
        reader_for(module).read(module, scope)
    return scope


@output_module_reader(("cace.modules.atomwise", "Atomwise"))
def read_atomwise(module: PickledObject, scope: ModelScope) -> None:
    a = module.__dict__
    if a.get("residual") or a.get("use_batchnorm") or a.get("post_process") is not None:
        raise UnsupportedCheckpointError(
            "residual/batch-norm/post-processed readouts are not supported"
        )
    if a.get("aggregation_mode", "sum") != "sum":
        raise UnsupportedCheckpointError("only summed atom-wise readouts are supported")
    inputs = per_atom_inputs(module)
    assembly = scope.assembly
    per_atom_key = str(a.get("per_atom_output_key"))
    is_charge = a.get("per_atom_output_key") is not None and per_atom_key in scope.charge_consumers
    if inputs and is_charge:
        raise UnsupportedCheckpointError("charge heads that read per-atom inputs are not supported")
    name = assembly.unique_name(per_atom_key if is_charge else str(a["output_key"]))
    prefix = f"readouts.{name}"
    sizes, act, bias = read_mlp(sub(module, "outnet"), f"{prefix}.mlp", assembly.state)
    linear_branch = bool(a.get("add_linear_nn"))
    if linear_branch:
        read_linear_branch(sub(module, "linear_nn"), prefix, assembly.state)
    n_out = int(sizes[-1])
    kind = "charge" if is_charge else "energy"
    # Widths of the inputs are known once the node features' width is (``finish``).
    assembly.add_readout(
        ReadoutConfig(
            name,
            kind,
            sizes[:-1],
            act,
            bias,
            linear_branch,
            n_out=n_out,
            inputs=dict.fromkeys(inputs, 0),
        )
    )
    if is_charge:
        assembly.charge_readouts[per_atom_key] = name
    elif n_out == 1:
        scope.add(a["output_key"], {name: 1.0})


def ewald_charge_inputs(module: PickledObject) -> list[str]:
    return [str(attr(module, "feature_key", "q"))]


@output_module_reader(("cace.modules.ewald", "EwaldPotential"), charge_inputs=ewald_charge_inputs)
def read_ewald(module: PickledObject, scope: ModelScope) -> None:
    e = module.__dict__
    if e.get("external_field") is not None:
        raise UnsupportedCheckpointError("Ewald terms with an external field are not supported")
    if e.get("charge_neutral_lambda") is not None:
        raise UnsupportedCheckpointError("charge-neutrality penalty terms are not supported")
    # Pickles from before the exponent attribute existed are Coulomb sums.
    if int(e.get("exponent", 1)) != 1:
        raise UnsupportedCheckpointError("only Coulomb (exponent 1) Ewald terms are supported")
    if e.get("aggregation_mode", "sum") != "sum":
        raise UnsupportedCheckpointError("only summed Ewald energies are supported")
    # sigma, dl and norm_factor are Python floats in the original; the kernel it
    # evaluates uses the derived sigma_sq_half and k_sq_max, also stored. Ours derives
    # them by the same float operations, so a file whose stored ones differ is refused.
    sigma, dl = float(e["sigma"]), float(e["dl"])
    for stored, derived in (
        ("sigma_sq_half", sigma**2 / 2.0),
        ("k_sq_max", (2.0 * math.pi / dl) ** 2),
    ):
        if stored in e and float(e[stored]) != derived:
            raise UnsupportedCheckpointError(
                f"EwaldPotential.{stored} is {e[stored]!r}, not {derived!r} from sigma/dl"
            )
    assembly = scope.assembly
    charge_key = str(e.get("feature_key", "q"))
    assembly.set_ewald(
        EwaldConfig(
            charge_readout=charges_of(scope, charge_key),
            dl=dl,
            sigma=sigma,
            exponent=1,
            remove_self_interaction=bool(e["remove_self_interaction"]),
            norm_factor=float(e.get("norm_factor", 1.0)),
            self_energy_every_channel=True,
        )
    )
    scope.add(e["output_key"], {assembly.ewald_term: 1.0})


def charges_of(scope: ModelScope, key: str) -> str:
    readout = scope.assembly.charge_readouts.get(key)
    if readout is None:
        raise UnsupportedCheckpointError(f"latent charges {key!r} come from no supported head")
    return readout


@output_module_reader(("cace.modules.feature_mix", "FeatureAdd"))
def read_feature_add(module: PickledObject, scope: ModelScope) -> None:
    keys = list(module.__dict__["feature_keys"])
    if all(k in scope.energy_keys for k in keys):
        total: LinearCombination = {}
        for k in keys:
            for term, c in scope.energy_keys[k].items():
                total[term] = total.get(term, 0.0) + c
        scope.add(module.__dict__["output_key"], total)


@output_module_reader(("cace.modules.forces", "Forces"))
def read_forces(module: PickledObject, scope: ModelScope) -> None:
    if scope.forces_energy_key is None:
        scope.forces_energy_key = str(module.__dict__["energy_key"])


def energy_of(scope: ModelScope) -> LinearCombination:
    if scope.forces_energy_key is None:
        raise UnsupportedCheckpointError("the model has no Forces module: no energy to serve")
    return scope.combination(scope.forces_energy_key)


@root_reader(("cace.models.atomistic", "NeuralNetworkPotential"))
def read_neural_network_potential(
    root: PickledObject,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    assembly = Assembly()
    fields = read_representation(sub(root, "representation"), assembly.state)
    scope = read_potential(root, assembly)
    return finish(assembly, fields, energy_of(scope)), assembly.state


def finish(assembly: Assembly, fields: dict[str, Any], energy: LinearCombination) -> dict[str, Any]:
    """ModelConfig fields of the assembled heads; drops heads that reach no output."""
    used = {r for r, c in energy.items() if c != 0.0}
    charge_users = set()
    if assembly.ewald is not None and assembly.ewald_term in used:
        assembly.ewald.weight = energy[assembly.ewald_term]
        charge_users.add(assembly.ewald.charge_readout)
    else:
        assembly.ewald = None
    if assembly.polarization is not None:
        charge_users.add(assembly.polarization.charge_readout)
    readouts = []
    for name, readout in assembly.readouts.items():
        if readout.inputs:
            readout.inputs = input_widths(readout, fields, assembly.state)
        if readout.kind == "energy" and name in used:
            readout.weight = energy[name]
            readouts.append(readout)
        elif readout.kind == "charge" and name in charge_users:
            readouts.append(readout)
        else:
            for key in [k for k in assembly.state if k.startswith(f"readouts.{name}.")]:
                del assembly.state[key]
    if not any(r.kind == "energy" for r in readouts) and assembly.ewald is None:
        raise UnsupportedCheckpointError("the model's energy has no term we can reproduce")
    unknown = used - {r.name for r in readouts} - {assembly.ewald_term}
    if unknown:
        raise UnsupportedCheckpointError(f"cannot reproduce energy terms {sorted(unknown)}")
    return {
        **fields,
        "readouts": readouts,
        "ewald": assembly.ewald,
        "polarization": assembly.polarization,
    }


def input_widths(
    readout: ReadoutConfig, fields: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Widths of a head's per-atom inputs: its first layer's columns after the node
    features, one per input (or all of them for a single input)."""
    n_features = node_feature_width(fields)
    n_in = int(state[f"readouts.{readout.name}.mlp.layers.0.weight"].shape[1])
    extra, names = n_in - n_features, list(readout.inputs)
    if extra == len(names):
        return dict.fromkeys(names, 1)
    if len(names) == 1 and extra > 0:
        return {names[0]: extra}
    raise UnsupportedCheckpointError(
        f"head {readout.name!r} reads {n_in} features: {n_features} node features and "
        f"{extra} columns for the inputs {names}, which cannot be told apart"
    )


def node_feature_width(fields: dict[str, Any]) -> int:
    """The width of the representation's node features for its config fields."""
    terms = explicit_terms(fields.get("symmetrizer_terms") or {})
    invariants = Symmetrizer(int(fields["max_l"]), int(fields["max_nu"]), terms).n_out
    channels = int(fields["n_atom_basis"]) ** 2
    layers = int(fields["num_message_passing"]) + 1
    return int(fields["n_radial"]) * invariants * channels * layers
