"""Every model the CACE authors published converts and equals the original.

Reads ../shared/reference/published (README there): for each checkpoint the
original's float64 outputs on a periodic box and an open cluster. Energies,
forces, the true strain-derivative stress, latent charges, dipoles, Born
effective charges and descriptors must agree within the tolerances of
tests/published_support.py; the files that are not models must be refused with
their reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cace_server.model import convert_original
from cace_server.model.checkpoint import UnsupportedCheckpointError
from cace_server.model.compiled import compile_model, total_stats
from tests.conftest import REFERENCE_DIR
from tests.published_support import (
    compare_checkpoint,
    family_of,
    manifest,
    model_names,
    prefixes,
    structure,
)

PUBLISHED = REFERENCE_DIR / "published"
NAMES = model_names(PUBLISHED) if (PUBLISHED / "manifest.json").exists() else []


def _smallest_per_family() -> list[str]:
    best: dict[str, tuple[int, str]] = {}
    for name in NAMES:
        family = family_of(manifest(PUBLISHED)[name])
        size = (PUBLISHED / name).stat().st_size
        if family not in best or size < best[family][0]:
            best[family] = (size, name)
    return [name for _, name in sorted(best.values(), key=lambda b: b[1])]


FAMILY_MODELS = _smallest_per_family()


def _skip_without_data() -> None:
    if not NAMES:
        pytest.skip(f"published reference models not present at {PUBLISHED}")


def test_published_folder_has_every_model() -> None:
    _skip_without_data()
    assert len(NAMES) == 86


@pytest.mark.parametrize("name", NAMES or ["<absent>"])
def test_published_model_equals_original_float64(name: str) -> None:
    _skip_without_data()
    result = compare_checkpoint(PUBLISHED, name)
    assert result.converted, result.error
    assert result.scores, result.error
    bad = {q: result.deviations[q] for q, s in result.scores.items() if s > 1.0}
    assert not bad, f"deviations beyond tolerance: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES or ["<absent>"])
def test_published_model_equals_original_float32(name: str) -> None:
    _skip_without_data()
    result = compare_checkpoint(PUBLISHED, name, float32=True)
    assert result.converted, result.error
    bad = {q: result.deviations[q] for q, s in result.scores.items() if s > 1.0}
    assert not bad, f"float32 deviations beyond 2e-3: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_MODELS or ["<absent>"])
def test_published_family_compiled_equals_eager(name: str, inductor_cache: str) -> None:
    """The compiled call of one model of each family equals the eager one in float64:
    to 1e-12 of each output's scale, max(1, largest |value|) (1e-12 eV/Å for forces of
    order 1 eV/Å; the random-charge models' forces reach 1,000 eV/Å, where a different
    summation order alone moves the 13th digit), and energies to 1e-12 relative to
    max(1 eV, |E|). Its structures go as one batch: one shape, one compile."""
    _skip_without_data()
    eager = convert_original(PUBLISHED / name, dtype="float64")
    model = convert_original(PUBLISHED / name, dtype="float64")
    calls = compile_model(model)
    model.group_atoms = 1 << 20  # every structure in one pass: one shape
    npz = np.load(PUBLISHED / name.replace(".pth", ".npz"))
    structures = [structure(npz, p) for p in prefixes(npz)]
    got, want = model.predict(structures), eager.predict(structures)
    stats = total_stats(calls)
    assert stats.compiles == 1 and stats.fallbacks == 0, stats
    for b, (p, q) in enumerate(zip(got, want, strict=True)):
        if np.isfinite(q.energy):
            assert abs(p.energy - q.energy) <= 1e-12 * max(1.0, abs(q.energy)), (b, p.energy)
        a, e = p.array_outputs(), q.array_outputs()
        assert set(a) == set(e)
        for key in e:
            scale = max(1.0, float(np.abs(e[key]).max(initial=0.0)))
            np.testing.assert_allclose(
                a[key], e[key], rtol=0, atol=1e-12 * scale, err_msg=f"{b}: {key}"
            )


@pytest.mark.parametrize(
    ("stem", "reason"),
    [
        (
            "ChengUCB_les_fit_MLIPs_CACE-LES_water_cace-r-4.5-nl-1-nu-2_checkpoint.pt",
            "training checkpoint",
        ),
        (
            "ChengUCB_les_fit_MLIPs_CACE-LES_water_cace-r-5.5-nl-1-nu-2_checkpoint.pt",
            "best_model.pth",
        ),
        (
            "ChengUCB_les_fit_MLIPs_MACE-LES_dipep_maceles-r-4.5-l-0_dipep_train_stagetwo.model",
            "MACE model",
        ),
    ],
)
def test_not_models_are_refused_with_their_reason(stem: str, reason: str) -> None:
    path = PUBLISHED / "not-models" / stem
    if not path.exists():
        pytest.skip(f"{path} not present")
    with pytest.raises(UnsupportedCheckpointError, match=reason):
        convert_original(path)


def test_manifest_lists_the_not_models() -> None:
    _skip_without_data()
    assert sum(n.startswith("not-models/") for n in manifest(PUBLISHED)) == 3


def test_training_checkpoint_with_its_architecture_converts(tmp_path) -> None:
    """The weights of a checkpoint.pt on the architecture of its best_model.pth."""
    from cace_server.model.checkpoint import load_restricted

    stem = "ChengUCB_les_fit_MLIPs_CACE-LES_water_cace-r-4.5-nl-1-nu-2"
    checkpoint = PUBLISHED / "not-models" / f"{stem}_checkpoint.pt"
    architecture = PUBLISHED / f"{stem}_best_model.pth"
    if not checkpoint.exists() or not architecture.exists():
        pytest.skip("published training checkpoint not present")
    model = convert_original(checkpoint, architecture=architecture, dtype="float64")
    weights = load_restricted(checkpoint)["model_state_dict"]
    ours = model.state_dict()
    # Same weights as the checkpoint (not the best model's), mapped onto our names.
    assert torch.equal(
        ours["representation.radial_mixing"][0],
        weights["representation.radial_transform.weights.0"].double(),
    )
    best = convert_original(architecture, dtype="float64")
    assert not torch.equal(
        ours["representation.radial_mixing"], best.state_dict()["representation.radial_mixing"]
    )


def test_training_checkpoint_on_a_foreign_architecture_is_refused(tmp_path) -> None:
    checkpoint = (
        PUBLISHED
        / "not-models"
        / "ChengUCB_les_fit_MLIPs_CACE-LES_water_cace-r-4.5-nl-1-nu-2_checkpoint.pt"
    )
    other = PUBLISHED / "BingqingCheng_cacefit_fit-water_best_model.pth"
    if not checkpoint.exists() or not other.exists():
        pytest.skip("published files not present")
    with pytest.raises(UnsupportedCheckpointError, match="does not fit the architecture"):
        convert_original(checkpoint, architecture=other)
