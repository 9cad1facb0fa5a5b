"""Angular tables of the original across its versions.

The Cartesian components and the symmetriser's invariants are stored in every
checkpoint. Versions differ in how (tuples, or strings such as ``'1_0_0'`` on the
torchscript branch) and, for some older models, in which invariants of
correlation order 3 they form (products over (l1, l2, l3) triples instead of our
(l1, l2) pairs). The stored table is the definition: where it matches ours we use
ours, otherwise the model carries the original's table verbatim in its config and
the symmetriser evaluates exactly those products, in the original's order.
"""

from __future__ import annotations

from typing import Any

from cace_server.model.angular import cartesian_components, symmetrizer_terms
from cace_server.model.checkpoint import PickledObject, UnsupportedCheckpointError
from cace_server.model.importer.registry import reads
from cace_server.model.importer.tree import require, sub

Component = tuple[int, int, int]

reads(
    ("cace.modules.angular", "AngularComponent"),
    ("cace.modules.symmetrize_basis", "Symmetrizer"),
)


def component(value: Any) -> Component:
    """(lx, ly, lz) from a tuple/list or the torchscript branch's 'lx_ly_lz' string."""
    parts = value.split("_") if isinstance(value, str) else list(value)
    if len(parts) != 3:
        raise UnsupportedCheckpointError(f"unreadable angular component {value!r}")
    lx, ly, lz = (int(p) for p in parts)
    return (lx, ly, lz)


def _key(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(p) for p in value.split("_"))
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def stored_terms(
    tables: dict[Any, Any], nu: int
) -> list[tuple[tuple[int, ...], list[Component], int]]:
    out = []
    for key, items in tables.get(nu, {}).items():
        for item in items:
            *components, prefactor = item
            if len(components) == 1 and len(components[0]) == nu:
                components = list(components[0])
            out.append((_key(key), [component(c) for c in components], int(prefactor)))
    return out


def check_angular_tables(rep: PickledObject, max_l: int, max_nu: int) -> dict[str, Any]:
    """Extra ModelConfig fields needed to reproduce the stored angular tables ({} if ours)."""
    angular = sub(rep, "angular_basis")
    require(angular, "AngularComponent")
    stored = [component(c) for c in angular.__dict__["lxlylz_list"]]
    # Our A-basis order is fixed; the invariants below are defined by components, so
    # a different storage order of the same components changes nothing.
    if sorted(stored) != sorted(cartesian_components(max_l)):
        raise UnsupportedCheckpointError("angular components differ from l <= max_l monomials")
    sym = sub(rep, "symmetrizer")
    require(sym, "Symmetrizer")
    tables = sym.__dict__.get("vec_dict_allnu") or {}
    explicit: dict[str, list[Any]] = {}
    for nu in range(2, max_nu + 1):
        theirs = stored_terms(tables, nu)
        ours = [(t.key, list(t.components), t.prefactor) for t in symmetrizer_terms(max_l, nu)]
        if not theirs:
            raise UnsupportedCheckpointError(f"checkpoint has no symmetriser table for nu={nu}")
        if _canonical(theirs) != _canonical(ours):
            explicit[str(nu)] = [[list(k), [list(c) for c in cs], p] for k, cs, p in theirs]
    return {"symmetrizer_terms": explicit} if explicit else {}


def _canonical(terms: list[tuple[tuple[int, ...], list[Component], int]]) -> list[Any]:
    """Invariants in order, each as the sorted multiset of its (components, prefactor)."""
    order: list[tuple[int, ...]] = []
    grouped: dict[tuple[int, ...], list[Any]] = {}
    for key, components, prefactor in terms:
        if key not in grouped:
            order.append(key)
            grouped[key] = []
        grouped[key].append((tuple(components), prefactor))
    return [(k, sorted(grouped[k])) for k in order]
