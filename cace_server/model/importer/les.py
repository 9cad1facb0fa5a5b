"""CACE-LES models: ``cace.modules.les_wrapper.LesWrapper`` around the external LES
package (``les.les.Les``: an Atomwise charge head and an Ewald sum).

Differences from CACE's own Ewald term, all carried by the config: LES charges
are in elementary charges (``charge_unit`` 1) scaled by ``output_scaling_factor``
(0.1), the energy is multiplied by ``norm_factor`` = 90.0474 (e^2/(2 eps0) in
eV Å), the self-interaction is removed by default, and the open-boundary pair
kernel is erf(r/(sigma sqrt 2))/r without CACE's 1e-6 softening. Older LES
versions (6f180d6) detached the cell in the reciprocal sum, so their own stress
lacks the cell term; ours is the true strain derivative of the same energy.
"""

from __future__ import annotations

from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.config import EwaldConfig, ReadoutConfig
from cace_server.model.importer.assembly import ModelScope
from cace_server.model.importer.core import feature_key_is_node_features
from cace_server.model.importer.registry import output_module_reader, reads
from cace_server.model.importer.tree import attr, read_linear_branch, read_mlp, require, sub

# 1 / (2 eps0) in eV Å / e^2, as the LES package writes it.
LES_NORM_FACTOR = 90.0474

# The external LES package (github ChengUCB/les), used through LesWrapper.
reads(
    ("les.les", "Les"),
    ("les.module.atomwise", "Atomwise"),
    ("les.module.ewald", "Ewald"),
    ("les.module.bec", "BEC"),
    ("les.module.blocks", "Dense"),
)


@output_module_reader(("cace.modules.les_wrapper", "LesWrapper"), family="les")
def read_les_wrapper(module: PickledObject, scope: ModelScope) -> None:
    feature_key_is_node_features(module)
    if attr(module, "compute_bec"):
        raise UnsupportedCheckpointError(
            "LES Born-effective-charge output (compute_bec) is not supported"
        )
    les = sub(module, "les")
    require(les, "Les")
    for flag in ("use_fixed_atomic_charges", "use_atomic_alpha", "use_epsilon_r_scaling"):
        if attr(les, flag):
            raise UnsupportedCheckpointError(f"LES models with {flag} are not supported")
    if not attr(les, "use_atomwise", True):
        raise UnsupportedCheckpointError("LES models without their own charge head")
    head = sub(les, "atomwise")
    require(head, "Atomwise")
    assembly = scope.assembly
    charge_key = str(attr(module, "charge_key", "LES_charge"))
    name = assembly.unique_name(charge_key)
    prefix = f"readouts.{name}"
    sizes, act, bias = read_mlp(sub(head, "outnet"), f"{prefix}.mlp", assembly.state)
    linear_branch = bool(attr(head, "add_linear_nn"))
    if linear_branch:
        read_linear_branch(sub(head, "linear_nn"), prefix, assembly.state)
    assembly.add_readout(
        ReadoutConfig(
            name,
            "charge",
            sizes[:-1],
            act,
            bias,
            linear_branch,
            n_out=int(sizes[-1]),
            scale=float(attr(head, "output_scaling_factor", 1.0)),
        )
    )
    assembly.charge_readouts[charge_key] = name
    if not attr(module, "compute_energy", True):
        return
    ewald = sub(les, "ewald")
    require(ewald, "Ewald")
    assembly.set_ewald(
        EwaldConfig(
            charge_readout=name,
            dl=float(attr(ewald, "dl", 2.0)),
            sigma=float(attr(ewald, "sigma", 1.0)),
            exponent=1,
            remove_self_interaction=bool(attr(ewald, "remove_self_interaction", True)),
            norm_factor=float(attr(ewald, "norm_factor", LES_NORM_FACTOR)),
            pair_epsilon=0.0,
            charge_unit=1.0,
        )
    )
    # Older wrappers (cace c2a3350) named the energy ``output_key``.
    energy_key = attr(module, "energy_key", attr(module, "output_key", "LES_energy"))
    scope.add(str(energy_key), {assembly.ewald_term: 1.0})
