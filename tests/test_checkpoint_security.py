"""The importer of original checkpoints never runs code from the pickle."""

from __future__ import annotations

import collections
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from cace_server.model.checkpoint import UnsafeCheckpointError, UnsupportedCheckpointError
from cace_server.model.convert import convert_original
from cace_server.model.importer import read_original_checkpoint


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_os_system_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _RunsShell(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system|os\.system"):
        read_original_checkpoint(path)
    assert not marker.exists()


def test_eval_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save(_Evals(marker), path)
    with pytest.raises(UnsafeCheckpointError, match=r"(__builtin__|builtins)\.eval"):
        convert_original(path)
    assert not marker.exists()


def _fake_module(name: str) -> types.ModuleType:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:k]), types.ModuleType(".".join(parts[:k])))
    return sys.modules[name]


@pytest.fixture
def fake_cace_modules():
    before = set(sys.modules)
    yield _fake_module
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_unsupported_cace_module_is_named(tmp_path, fake_cace_modules):
    module = fake_cace_modules("cace.modules.les_wrapper")

    class Les:
        pass

    Les.__module__ = module.__name__
    Les.__qualname__ = "Les"
    module.Les = Les
    path = tmp_path / "les.pth"
    torch.save(Les(), path)
    with pytest.raises(UnsupportedCheckpointError, match=r"cace\.modules\.les_wrapper\.Les"):
        read_original_checkpoint(path)


def test_allowed_class_cannot_be_called(tmp_path, fake_cace_modules):
    """A REDUCE on an allowed class name (to run its constructor) is refused."""
    module = fake_cace_modules("cace.modules.type")

    class NodeEncoder:
        def __init__(self, *args):
            self.args = args

    NodeEncoder.__module__ = module.__name__
    NodeEncoder.__qualname__ = "NodeEncoder"
    module.NodeEncoder = NodeEncoder

    class CallsConstructor:
        def __reduce__(self):
            return (NodeEncoder, ("payload",))

    path = tmp_path / "call.pth"
    torch.save(CallsConstructor(), path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_original_checkpoint(path)


def test_garbage_file_gives_clear_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\xff" * 4096)
    with pytest.raises(UnsupportedCheckpointError, match="not a readable torch checkpoint"):
        read_original_checkpoint(path)


def test_random_bytes_only_ever_raise_our_errors(tmp_path):
    """Random bytes may even decode as a pickle naming a random global: always refused."""
    import random

    rng = random.Random(1234)
    path = tmp_path / "random.pth"
    for _ in range(200):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 512))))
        with pytest.raises((UnsupportedCheckpointError, UnsafeCheckpointError)):
            read_original_checkpoint(path)


def test_plain_state_dict_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(UnsupportedCheckpointError, match="expected a pickled CACE model"):
        read_original_checkpoint(path)


def test_numeric_numpy_scalars_load(tmp_path):
    """Published checkpoints hold numpy.int64 element numbers: numeric scalars load."""
    import numpy as np

    from cace_server.model.checkpoint import load_restricted

    path = tmp_path / "scalars.pth"
    torch.save({"z": np.int64(8), "x": np.float64(1.5), "b": np.bool_(True)}, path)
    data = load_restricted(path)
    assert data["z"] == 8 and isinstance(data["z"], np.integer)
    assert data["x"] == 1.5 and data["b"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda np: np.dtype("O"), id="object-dtype"),
        pytest.param(lambda np: np.array([1, 2, 3]), id="ndarray"),
        pytest.param(lambda np: np.array([object()], dtype=object), id="object-array"),
        pytest.param(lambda np: np.dtype([("a", "<i8")]), id="structured-dtype"),
    ],
)
def test_anything_else_numpy_is_refused(tmp_path, payload):
    import numpy as np

    path = tmp_path / "numpy.pth"
    torch.save({"x": payload(np)}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_original_checkpoint(path)


def test_getattr_is_only_for_the_combine_operation(tmp_path):
    class Reduce:
        def __reduce__(self):
            return (getattr, (collections.OrderedDict, "fromkeys"))

    path = tmp_path / "getattr.pth"
    torch.save(Reduce(), path)
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        read_original_checkpoint(path)


def test_torchscript_archives_are_refused(tmp_path):
    module = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "scripted.pt"
    module.save(str(path))
    with pytest.raises(UnsupportedCheckpointError, match="TorchScript"):
        read_original_checkpoint(path)


def test_every_reader_class_is_allowed():
    """The allow-list is built from what the readers register: each of them loads."""
    from cace_server.model.importer.registry import (
        OUTPUT_MODULE_READERS,
        READ_CLASSES,
        ROOT_READERS,
        allow_list,
    )

    allowed = allow_list()
    assert set(ROOT_READERS) | set(OUTPUT_MODULE_READERS) <= allowed.classes
    assert allowed.classes == READ_CLASSES
    assert {"cace", "les"} <= allowed.packages and "torch" not in allowed.packages


@pytest.mark.parametrize(
    ("module_name", "error"),
    [
        ("cace.modules.undeclared", UnsupportedCheckpointError),
        ("torch.nn.modules.undeclared", UnsafeCheckpointError),
        ("somepackage.models", UnsafeCheckpointError),
    ],
)
def test_class_no_reader_declares_is_refused(tmp_path, fake_cace_modules, module_name, error):
    module = fake_cace_modules(module_name)

    class Undeclared:
        pass

    Undeclared.__module__ = module.__name__
    Undeclared.__qualname__ = "Undeclared"
    module.Undeclared = Undeclared
    path = tmp_path / "undeclared.pth"
    torch.save(Undeclared(), path)
    with pytest.raises(error, match=rf"{module_name}\.Undeclared"):
        read_original_checkpoint(path)
