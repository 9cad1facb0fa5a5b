"""The Docker images and the compose file, checked without a Docker engine.

Fast tests read docker/Dockerfile.{cpu,cuda}, .dockerignore and docker/compose.yaml
and check what the images promise (pinned bases, non-root user, HEALTHCHECK, the
entrypoint, settings that exist). The slow test replays the CPU Dockerfile's build
stage in a fresh virtual environment (its RUN commands, as written, with the image's
paths moved under a temporary root), then starts the image's ENTRYPOINT with the
image's ENV, runs its HEALTHCHECK command and stops the server with SIGTERM. A slow
i-PI test runs the compose example's i-PI input against `cace-server serve` configured
by the compose file's environment.
"""

from __future__ import annotations

import dataclasses
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cace_server.settings import ServerSettings, server_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
COMPOSE = DOCKER / "compose.yaml"
SETTINGS = set(server_settings())
IPI_SCRIPT = Path(sys.executable).with_name("i-pi")

# ------------------------------------------------------------------ Dockerfile parsing


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), self.args
        return value


@dataclasses.dataclass
class Dockerfile:
    instructions: list[Instruction]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        logical: list[str] = []
        current = ""
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue  # comments, also inside a continued instruction
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            current += line
            if current.strip():
                logical.append(current.strip())
            current = ""
        assert not current.strip(), f"{path}: unterminated continuation"
        out: list[Instruction] = []
        stage = -1
        for text in logical:
            keyword, _, args = text.partition(" ")
            keyword = keyword.upper()
            if keyword == "FROM":
                stage += 1
            out.append(Instruction(keyword, " ".join(args.split()), stage))
        return cls(out)

    def stage(self, index: int) -> list[Instruction]:
        """Instructions of stage ``index`` (-1: the global ARGs before the first FROM)."""
        return [i for i in self.instructions if i.stage == index]

    @property
    def n_stages(self) -> int:
        return max(i.stage for i in self.instructions) + 1

    @property
    def final(self) -> int:
        return self.n_stages - 1

    def global_args(self) -> dict[str, str]:
        return dict(_args(i.args) for i in self.stage(-1) if i.keyword == "ARG")

    def last(self, keyword: str, stage: int | None = None) -> Instruction:
        """The last ``keyword`` instruction of a stage (default: the runtime stage)."""
        index = self.final if stage is None else stage
        found = [i for i in self.stage(index) if i.keyword == keyword]
        assert found, f"no {keyword} in stage {stage}"
        return found[-1]

    def env(self, stage: int | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.stage(self.final if stage is None else stage):
            if i.keyword == "ENV":
                out.update(_env_pairs(i.args))
        return out


def _args(text: str) -> tuple[str, str]:
    name, _, default = text.partition("=")
    return name.strip(), default.strip()


def _env_pairs(text: str) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(text):
        name, sep, value = token.partition("=")
        assert sep, f"ENV {text!r}: use the NAME=VALUE form"
        pairs[name] = value
    return pairs


def expand(text: str, env: dict[str, str]) -> str:
    """Docker's $NAME / ${NAME} substitution (enough for these files)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, Dockerfile.read(DOCKERFILES[request.param])


# ------------------------------------------------------------------ fast: Dockerfiles


def test_base_image_is_a_pinned_overridable_argument(dockerfile: tuple[str, Dockerfile]) -> None:
    kind, df = dockerfile
    base = df.global_args().get("BASE_IMAGE")
    assert base, "ARG BASE_IMAGE=<image> before the first FROM"
    name, _, tag = base.rpartition(":")
    assert name and tag and tag != "latest" and "@" not in name
    assert re.search(r"\d+\.\d+\.\d+", tag), f"{base}: pin a full version"
    expected = "python:3.11." if kind == "cpu" else "pytorch/pytorch:2."
    assert base.startswith(expected)
    if kind == "cuda":
        assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag
    froms = [i.args for i in df.instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    for args in froms:
        image = args.split()[0]
        assert image == "${BASE_IMAGE}", f"FROM {args}: use the BASE_IMAGE argument"


def test_runtime_stage_runs_the_server_as_a_non_root_user(
    dockerfile: tuple[str, Dockerfile],
) -> None:
    _, df = dockerfile
    user = df.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0"), user
    # the numeric USER is the account the runtime stage creates
    creates = " ".join(i.args for i in df.stage(df.final) if i.keyword == "RUN")
    assert f"useradd --no-log-init --uid {uid} " in creates and f"--gid {gid} " in creates
    assert df.last("ENTRYPOINT").json_args() == ["cace-server", "serve"]
    env = df.env()
    assert env["CACE_SERVER_HOST"] == "0.0.0.0"
    port = int(env["CACE_SERVER_PORT"])
    assert df.last("EXPOSE").args.split() == [str(port)]
    assert port == ServerSettings().http.port
    for name in env:
        if name.startswith("CACE_SERVER_"):
            assert name[len("CACE_SERVER_") :].lower() in SETTINGS, f"{name} is no setting"
    assert "/opt/venv/bin" in env["PATH"].split(":")[0]
    volumes = df.last("VOLUME").json_args()
    assert "/models" in volumes and "/run/ipi" in volumes


def test_healthcheck_uses_python_on_healthz(dockerfile: tuple[str, Dockerfile]) -> None:
    _, df = dockerfile
    check = df.last("HEALTHCHECK").args
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options and "--start-period=" in options
    assert json.loads(command) == ["python", "/opt/cace/healthcheck.py"]
    copies = [i.args.split() for i in df.stage(df.final) if i.keyword == "COPY"]
    assert ["docker/healthcheck.py", "/opt/cace/healthcheck.py"] in copies
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()


def test_installs_avoid_pip_cache_and_dev_extras(dockerfile: tuple[str, Dockerfile]) -> None:
    kind, df = dockerfile
    runs = [i.args for i in df.instructions if i.keyword == "RUN"]
    installs = [part for run in runs for part in run.split("&&") if " install " in part]
    assert installs
    for part in installs:
        if "pip" in part:
            assert "--no-cache-dir" in part, part
        assert "[test]" not in part and ".[" not in part, f"dev extras in the image: {part}"
    assert any(part.strip().endswith(" install --no-cache-dir .") for part in installs)
    if kind == "cpu":
        args = dict(_args(i.args) for i in df.stage(0) if i.keyword == "ARG")
        assert args["TORCH_SPEC"] == "torch==2.13.0"
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    else:
        # the CUDA image keeps the base image's torch (no torch install of its own)
        assert not any("torch" in part.split("install", 1)[1] for part in installs)
        assert any("--system-site-packages" in run for run in runs)


def _glob_regex(pattern: str) -> str:
    """Go's filepath.Match syntax plus Docker's ``**`` (any number of directories)."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return out


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (
        ".git",
        ".venv",
        ".venv-ci/bin/python",
        "benchmarks/out/x.json",
        "tests/test_docker.py",
        ".pytest_cache/v",
        ".hypothesis/examples",
        "cace_server/__pycache__/cli.cpython-311.pyc",
        "cace_server.egg-info/PKG-INFO",
        "docker/compose.yaml",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be in the build context"
    # every COPY source of both Dockerfiles is in the context
    for df in map(Dockerfile.read, DOCKERFILES.values()):
        for i in df.instructions:
            if i.keyword != "COPY" or i.args.startswith("--from"):
                continue
            for source in i.args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not dockerignore_excludes(source.rstrip("/"), patterns), source
    for path in ("cace_server/cli.py", "cace_server/model/io.py", "cace_server/data/x"):
        assert not dockerignore_excludes(path, patterns), path


def test_hadolint_finds_nothing_above_info_level() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (make docker-lint installs it)")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "warning", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ fast: health check


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_server() -> Iterator[tuple[int, dict[str, Any]]]:
    """A loopback HTTP server answering /healthz with a settable status and body."""
    state: dict[str, Any] = {"status": 200, "body": {"status": "ok"}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = state["status"] if self.path == "/healthz" else 404
            data = json.dumps(state["body"]).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_healthcheck_script(
    fake_server: tuple[int, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, state = fake_server
    check = _load_healthcheck()
    monkeypatch.setenv("CACE_SERVER_HOST", "0.0.0.0")  # the image's bind address
    monkeypatch.setenv("CACE_SERVER_PORT", str(port))
    assert check.main() == 0
    state["body"] = {"status": "starting"}
    assert check.main() == 1
    state["status"], state["body"] = 500, {"status": "ok"}
    assert check.main() == 1
    monkeypatch.setenv("CACE_SERVER_HTTP", "false")  # i-PI only: nothing to ask
    assert check.main() == 0
    monkeypatch.delenv("CACE_SERVER_HTTP")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("CACE_SERVER_PORT", str(free))
    assert check.main() == 1


# ------------------------------------------------------------------ fast: compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _volume(spec: str) -> tuple[str, str]:
    """SOURCE:TARGET[:MODE] -> (SOURCE, TARGET); SOURCE may hold ${VAR:-default}."""
    if spec.endswith((":ro", ":rw")):
        spec = spec[:-3]
    source, _, target = spec.rpartition(":")
    return source, target


def volume_source(spec: str) -> str:
    return _volume(spec)[0]


def volume_target(spec: str) -> str:
    return _volume(spec)[1]


def test_compose_server_reserves_a_gpu_and_serves_http(compose: dict[str, Any]) -> None:
    server = compose["services"]["cace"]
    build = server["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[
        "cuda"
    ].resolve()
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = server["environment"]
    assert env["CACE_SERVER_DEVICE"] == "cuda"
    for name in env:
        assert name.startswith("CACE_SERVER_") and name[12:].lower() in SETTINGS, name
    host_port = [p for p in server["ports"] if p.endswith(":8000")]
    assert host_port and host_port[0].startswith("127.0.0.1:"), "publish on loopback"
    mounts = {volume_target(v): v for v in server["volumes"]}
    assert "/models" in mounts and mounts["/models"].endswith(":ro")
    assert env["CACE_SERVER_MODEL"].split(":-")[-1].rstrip("}").startswith("/models/")


def test_compose_ipi_service_shares_sockets_and_ipc(compose: dict[str, Any]) -> None:
    services = compose["services"]
    server, ipi = services["cace"], services["ipi"]
    assert ipi["image"] == server["image"] and ipi["entrypoint"] == ["i-pi"]
    socket_volumes = {volume_source(v) for v in server["volumes"] if volume_target(v) == "/run/ipi"}
    assert socket_volumes and socket_volumes <= {volume_source(v) for v in ipi["volumes"]}
    assert socket_volumes <= set(compose["volumes"])
    # shm transport: i-PI's POSIX shared memory must be visible to the server
    assert ipi["ipc"] == "shareable" and server["ipc"] == "service:ipi"
    assert ipi["shm_size"]
    assert server["depends_on"]["ipi"]


def test_compose_keeps_compiled_graphs_on_a_volume(compose: dict[str, Any]) -> None:
    env = compose["services"]["cace"]["environment"]
    assert env["CACE_SERVER_COMPILE"] == "${CACE_COMPILE:-off}"  # opt-in
    cache = env["CACE_SERVER_COMPILE_CACHE_DIR"]
    mounts = {volume_target(v): volume_source(v) for v in compose["services"]["cace"]["volumes"]}
    assert mounts.get(cache) in compose["volumes"], "a named volume: it outlives the container"
    # the warm-up compiles the batch i-PI sends: its template, one copy per bead
    path, _, copies = env["CACE_SERVER_COMPILE_WARMUP"].rpartition(":")
    assert path == env["CACE_SERVER_IPI_TEMPLATE"] and copies == env["CACE_SERVER_IPI_CLIENTS"]
    # a new named volume takes the ownership of the image's directory: the server's user
    df = Dockerfile.read(DOCKERFILES["cuda"])
    runs = " ".join(i.args for i in df.stage(df.final) if i.keyword == "RUN")
    assert re.search(rf"mkdir -p [^&]*{cache}", runs), runs
    assert re.search(rf"chown cace:cace [^&]*{cache}", runs), runs


def _ipi_input() -> ET.Element:
    return ET.parse(DOCKER / "ipi" / "input.xml").getroot()


def test_compose_ipi_input_matches_the_server_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["cace"]["environment"]
    root = _ipi_input()
    prefix = root.attrib["sockets_prefix"]
    socket_ = root.find("ffsocket")
    assert socket_ is not None
    address = (socket_.findtext("address") or "").strip()
    scheme = {"unix": "unix", "shm": "shm"}[socket_.attrib["mode"]]
    assert env["CACE_SERVER_IPI"] == f"{scheme}:{prefix}{address}"
    assert prefix.startswith("/run/ipi/")
    beads = root.find("system/initialize")
    assert beads is not None and int(env["CACE_SERVER_IPI_CLIENTS"]) == int(beads.attrib["nbeads"])
    init = (root.findtext("system/initialize/file") or "").strip()
    assert init == env["CACE_SERVER_IPI_TEMPLATE"] == "/ipi/init.xyz"
    assert "./ipi:/ipi:ro" in compose["services"]["ipi"]["volumes"]
    import ase.io

    atoms = ase.io.read(DOCKER / "ipi" / "init.xyz")
    assert atoms.get_chemical_formula() == "H128O64" and atoms.pbc.all()
    distances = atoms.get_all_distances(mic=True)
    assert distances[distances > 0].min() > 0.9


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    """Against the compose-spec JSON schema kept in tests/data ($COMPOSE_SPEC_SCHEMA: another)."""
    import jsonschema

    default = Path(__file__).parent / "data" / "compose-spec.json"
    schema_path = Path(os.environ.get("COMPOSE_SPEC_SCHEMA") or default)
    schema = json.loads(schema_path.read_text())
    errors = [
        f"{list(e.path)}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose)
    ]
    assert not errors, errors


# ------------------------------------------------------------------ slow: the CPU image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ImageReplay:
    """A Dockerfile's instructions replayed under ``root`` (the image's ``/``)."""

    def __init__(self, root: Path, build_args: dict[str, str]) -> None:
        self.root = root
        self.build_args = build_args
        self.env: dict[str, str] = {}
        self.workdir = "/"

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def host_value(self, value: str) -> str:
        """ENV values that are image paths (/opt/..., /src) point into the root."""
        parts = []
        for part in value.split(":"):
            if part.startswith(("/opt/", "/src", "/home/")) or part == "/opt":
                part = str(self.path(part))
            parts.append(part)
        return ":".join(parts)

    def stage(self, df: Dockerfile, index: int, *, run: bool) -> None:
        base_path = os.environ["PATH"]
        self.env, self.workdir = {}, "/"  # every stage starts from the base image
        for ins in df.stage(index):
            if ins.keyword == "ARG":
                name, default = _args(ins.args)
                self.env[name] = self.build_args.get(name, default)
            elif ins.keyword == "ENV":
                for name, value in _env_pairs(ins.args).items():
                    # image paths first, then $PATH: the host's PATH is no image path
                    value = expand(self.host_value(value), {"PATH": base_path, **self.env})
                    self.env[name] = value
            elif ins.keyword == "WORKDIR":
                self.workdir = ins.args
                self.path(self.workdir).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                if ins.args.startswith("--from="):
                    continue  # the build stage wrote to the same root
                *sources, dest = ins.args.split()
                target = self.path(
                    dest if dest.startswith("/") else f"{self.workdir.rstrip('/')}/{dest}"
                )
                for source in sources:
                    src = ROOT / source
                    if src.is_dir():
                        shutil.copytree(
                            src,
                            target,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
                        )
                    else:
                        to = target / src.name if dest.endswith("/") else target
                        to.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(src, to)
            elif ins.keyword == "RUN" and run:
                proc = subprocess.run(
                    ["sh", "-ec", ins.args],
                    cwd=self.path(self.workdir),
                    env=self.process_env(),
                    capture_output=True,
                    text=True,
                    timeout=1200,
                )
                assert proc.returncode == 0, (
                    f"RUN {ins.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                )

    def process_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        # `python3` in the image is the base interpreter, not the venv running pytest
        shim = self.root / "shim"
        shim.mkdir(exist_ok=True)
        if not (shim / "python3").exists():
            (shim / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
        env.update(self.env)
        env["PATH"] = f"{shim}:{env.get('PATH', os.defpath)}"
        env.update(extra)
        return env


@pytest.mark.slow
def test_cpu_image_install_and_entrypoint_serve_healthz(tmp_path: Path) -> None:
    df = Dockerfile.read(DOCKERFILES["cpu"])
    assert df.n_stages == 2
    # On this project's machines pip resolves torch==2.13.0 to the local CPU wheel; the
    # PyTorch CPU index of the image's default is not reachable from here.
    image = ImageReplay(
        tmp_path / "root",
        {"TORCH_INDEX_URL": os.environ.get("CACE_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")},
    )
    image.stage(df, 0, run=True)
    venv = Path(image.env["VIRTUAL_ENV"])
    assert venv == image.path("/opt/venv")
    # the runtime stage: ENV, the health check file; its RUN makes the user (needs root)
    image.stage(df, 1, run=False)
    assert image.path("/opt/cace/healthcheck.py").is_file()

    # what was installed: the package (with its data files) from a wheel, no test tools
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, json, pathlib, torch, cace_server; "
            "print(json.dumps([cace_server.__file__, torch.__version__, "
            "importlib.util.find_spec('pytest') is not None]))",
        ],
        cwd=tmp_path,
        env=image.process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    package_file, torch_version, has_pytest = json.loads(probe.stdout)
    package = Path(package_file).parent
    assert package.is_relative_to(venv), package
    assert torch_version.startswith("2.13.0")
    assert not has_pytest, "dev extras were installed"
    assert (package / "py.typed").is_file()
    data = ROOT / "cace_server" / "data"
    for shipped in data.glob("*") if data.is_dir() else []:
        assert (package / "data" / shipped.name).is_file(), f"{shipped.name} not installed"

    # the entrypoint, with the image's environment and a mounted model; loopback only
    from cace_server.model.build import random_model
    from cace_server.model.io import save_model

    models = image.path("/models")
    models.mkdir(parents=True)
    save_model(random_model((1, 8)), models / "water.safetensors")
    port = _free_port()
    env = image.process_env(
        CACE_SERVER_HOST="127.0.0.1",
        CACE_SERVER_PORT=str(port),
        CACE_SERVER_MODEL=str(models / "water.safetensors"),
        OMP_NUM_THREADS="1",
    )
    assert image.env["CACE_SERVER_HOST"] == "0.0.0.0"  # what the image itself sets
    entrypoint = df.last("ENTRYPOINT").json_args()
    program = shutil.which(entrypoint[0], path=env["PATH"])
    assert program is not None and Path(program).parent == venv / "bin"
    check = json.loads(df.last("HEALTHCHECK").args.partition("CMD ")[2])
    check_cmd = [shutil.which(check[0], path=env["PATH"]) or check[0]]
    check_cmd += [str(image.path(a)) if a.startswith("/opt/") else a for a in check[1:]]
    home = image.path("/home/cace")
    home.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [program, *entrypoint[1:]],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        healthy = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            result = subprocess.run(check_cmd, env=env, capture_output=True, timeout=30)
            if result.returncode == 0:
                healthy = True
                break
            time.sleep(0.5)
        assert healthy, log_path.read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


# ------------------------------------------------------------------ slow: the i-PI example


@pytest.mark.slow
@pytest.mark.ipi
@pytest.mark.parametrize("mode", ["unix", "shm"])
def test_compose_ipi_example_runs_against_the_server(
    tmp_path: Path, socket_dir: str, compose: dict[str, Any], mode: str
) -> None:
    """docker/ipi/input.xml (3 steps, 8 beads) driven by `cace-server serve` configured
    with the compose file's environment; container paths mapped to local ones."""
    if not IPI_SCRIPT.exists():
        pytest.skip("the i-pi program is not installed")
    from cace_server.model.build import random_model
    from cace_server.model.io import save_model

    root = _ipi_input()
    container_prefix = root.attrib["sockets_prefix"]
    root.set("sockets_prefix", socket_dir + "/ipi_")
    total = root.find("total_steps")
    assert total is not None
    total.text = " 3 "
    ffsocket = root.find("ffsocket")
    assert ffsocket is not None
    ffsocket.set("mode", mode)
    init = root.find("system/initialize/file")
    assert init is not None and init.text is not None
    init.text = str(DOCKER / "ipi" / init.text.strip().removeprefix("/ipi/"))
    stride = root.find("output/properties")
    assert stride is not None
    stride.set("stride", "1")
    workdir = tmp_path / "ipi"
    workdir.mkdir()
    ET.ElementTree(root).write(workdir / "input.xml")

    env_in = dict(compose["services"]["cace"]["environment"])
    address = env_in["CACE_SERVER_IPI"].replace(container_prefix, socket_dir + "/ipi_")
    if mode == "shm":
        address = "shm:" + address.partition(":")[2]
    model = save_model(random_model((1, 8)), tmp_path / "water.safetensors")
    server_env = dict(
        os.environ,
        CACE_SERVER_MODEL=str(model),
        CACE_SERVER_HTTP="false",
        CACE_SERVER_IPI=address,
        CACE_SERVER_IPI_CLIENTS=env_in["CACE_SERVER_IPI_CLIENTS"],
        CACE_SERVER_IPI_TEMPLATE=str(DOCKER / "ipi" / "init.xyz"),
        CACE_SERVER_DTYPE=env_in["CACE_SERVER_DTYPE"],
        OMP_NUM_THREADS="2",
    )
    ipi_log = open(workdir / "ipi.log", "wb")  # noqa: SIM115 - closed below
    ipi = subprocess.Popen(
        [sys.executable, str(IPI_SCRIPT), "input.xml"],
        cwd=workdir,
        stdout=ipi_log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        start_new_session=True,
    )
    server_log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "cace_server.cli", "serve"],
        env=server_env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            code = ipi.wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = None
        logs = (workdir / "ipi.log").read_text()[-3000:] + (tmp_path / "server.log").read_text()[
            -3000:
        ]
        assert code == 0, logs
        steps = [
            line
            for line in (workdir / "water.out").read_text().splitlines()
            if not line.startswith("#")
        ]
        assert len(steps) == 4, logs  # step 0 and 3 steps
        assert server.poll() is None, "the server exited with i-PI"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, logs
    finally:
        for proc in (ipi, server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        ipi_log.close()
        server_log.close()
