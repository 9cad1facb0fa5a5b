"""The Kubernetes manifests (deploy/kubernetes/), checked offline.

Every YAML document under deploy/ that is a Kubernetes object is validated against the
Kubernetes API's JSON schemas (the ``kubernetes-validate`` package, which bundles them)
for the oldest and the newest Kubernetes version we support. Custom resources (the
Prometheus Operator's ServiceMonitor, KubeRay's RayService) have no schema there: they
are checked for apiVersion/kind/name, and the pod templates inside a RayService are
validated as core PodTemplates. Documents without a ``kind`` are other tools' files
(Helm values, a Ray Serve config) and are only parsed.

The Kustomize directories are rendered here the way ``kubectl kustomize`` does for the
features they use (resources, strategic-merge patches, images; anything else is
refused), compared with ``kubectl kustomize`` where kubectl is installed, and the
rendered objects are checked against the server: probe paths and port, environment
variables (every one a real setting, the set taken from the settings code), the
termination grace period, the HPA's metric (one that /metrics exports).
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import inspect
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cace_server import server as server_module
from cace_server.http.routes.health import router as health_router
from cace_server.settings import ENV_PREFIX, load_settings, server_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
#: the oldest Kubernetes the manifests support (README) and the newest with schemas.
OLDEST_KUBERNETES = "1.29"
#: API groups of custom resources the schemas do not include.
CUSTOM_GROUPS = ("monitoring.coreos.com/", "ray.io/")
#: what the Dockerfiles promise (docker/README.md): user, image tags.
IMAGE_USER = 10001
IMAGE_REPOSITORY = "cace-server"
#: seconds the termination grace period keeps beyond the server's own bounds.
GRACE_MARGIN_S = 10


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ------------------------------------------------------------------ Kustomize, the subset used

#: list fields merged item by item (by this key) in a strategic-merge patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def merge(original: Any, patch: Any, key: str | None = None) -> Any:
    """A strategic-merge patch as kustomize applies it: maps merge, ``null`` deletes,
    keyed lists merge by their key (the patch's items first, then the others)."""
    if isinstance(original, dict) and isinstance(patch, dict):
        out = dict(original)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            elif name in out:
                out[name] = merge(out[name], value, name)
            else:
                out[name] = copy.deepcopy(value)
        return out
    if isinstance(original, list) and isinstance(patch, list) and key in MERGE_KEYS:
        field = MERGE_KEYS[key]
        by_key = {item[field]: item for item in original}
        patched = [merge(by_key.get(p[field], {}), p) for p in patch]
        given = {p[field] for p in patch}
        return patched + [item for item in original if item[field] not in given]
    return copy.deepcopy(patch)


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def set_image(image: str, rule: dict[str, str]) -> str:
    name, _, tag = image.partition(":")
    if name != rule["name"]:
        return image
    return f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize DIRECTORY`` outputs, for the features our files use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: this test renders no {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else documents(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only patches by path are rendered here"
        for patch in documents(directory / entry["path"]):
            ident = (patch["kind"], patch["metadata"]["name"])
            matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) == ident]
            assert len(matches) == 1, f"{directory}: patch {entry['path']} matches {ident} once"
            index = objects.index(matches[0])
            if patch.get("$patch") == "delete":
                del objects[index]
            else:
                objects[index] = merge(matches[0], patch)
    for rule in kustomization.get("images", []):
        for obj in objects:
            for container in pod_containers(obj):
                container["image"] = set_image(container["image"], rule)
    return objects


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for obj in objects:
        assert obj["kind"] not in out, f"two {obj['kind']}s: the checks below expect one"
        out[obj["kind"]] = obj
    return out


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def rendered(request: pytest.FixtureRequest) -> tuple[Path, dict[str, dict[str, Any]]]:
    return request.param, by_kind(render(request.param))


def test_there_is_a_base_and_overlays() -> None:
    names = {str(p.relative_to(K8S)) for p in KUSTOMIZATIONS}
    assert {"base", "overlays/cpu", "overlays/model-from-url"} <= names


def test_the_renderer_agrees_with_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendering is not compared with kustomize's")
    for directory in KUSTOMIZATIONS:
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
        ours = {(o["kind"], o["metadata"]["name"]): o for o in render(directory)}
        assert ours == theirs, directory


def test_every_manifest_file_is_used() -> None:
    """A file in a Kustomize directory that no kustomization names would be forgotten
    by ``kubectl apply -k``."""
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        named = set(kustomization.get("resources", [])) | {
            p["path"] for p in kustomization.get("patches", [])
        }
        files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert files <= named, f"{directory}: {sorted(files - named)} not in kustomization.yaml"


# ------------------------------------------------------------------ schemas


def patch_files() -> set[Path]:
    """Strategic-merge patches: partial objects, validated once applied (rendered)."""
    out = set()
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        out |= {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}
    return out


def kubernetes_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for every Kubernetes object under deploy/, overlays rendered."""
    patches = patch_files()
    for path in yaml_files():
        if path.name == "kustomization.yaml" or path.resolve() in patches:
            continue
        for doc in documents(path):
            if "kind" in doc:
                yield str(path.relative_to(ROOT)), doc
    for directory in KUSTOMIZATIONS:
        for obj in render(directory):
            yield f"{directory.relative_to(ROOT)} (rendered)", obj


def embedded_pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The core pod templates inside a KubeRay RayService / RayCluster."""
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterConfig", spec) if obj["kind"] == "RayService" else spec
    head = cluster.get("headGroupSpec", {}).get("template")
    workers = [g.get("template") for g in cluster.get("workerGroupSpecs", [])]
    return [t for t in [head, *workers] if t is not None]


@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_every_object_matches_the_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    wanted = OLDEST_KUBERNETES if version == "oldest" else kv.latest_version()
    checked = []
    for where, obj in kubernetes_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(obj), where
        assert obj["metadata"].get("name"), f"{where}: {obj['kind']} without a name"
        custom = obj["apiVersion"].startswith(CUSTOM_GROUPS)
        # no schema ships for custom resources: their pod templates are checked
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}}
        parts = [{**pod, "template": t} for t in embedded_pod_templates(obj)] if custom else [obj]
        for part in parts:
            try:
                kv.validate(part, wanted, strict=True)
            except kv.ValidationError as exc:
                path = "/".join(str(p) for p in exc.absolute_path)
                pytest.fail(
                    f"{where}: {obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}"
                )
        checked.append(obj["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(
        checked
    )


def test_other_yaml_files_parse() -> None:
    for path in yaml_files():
        assert documents(path), f"{path}: empty"


# ------------------------------------------------------------------ drift: the server's settings


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are checked here"
        out[item["name"]] = item["value"]
    return out


def effective(env: dict[str, str]) -> Any:
    """The settings the server builds from the container's environment."""
    return load_settings(environ=env)


def test_environment_names_real_settings_with_valid_values(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    env = container_env(server_container(objects["Deployment"]))
    settings = {ENV_PREFIX + name.upper() for name in server_settings()}
    assert set(env) <= settings, f"not settings: {sorted(set(env) - settings)}"
    effective(env)  # every value parses and validates


def test_server_listens_on_the_container_port(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    container = server_container(objects["Deployment"])
    http = effective(container_env(container)).http
    # kubelet probes and the Service reach the pod's IP, not its loopback
    assert http.enabled and http.host in ("0.0.0.0", "::")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": http.port}
    service = objects["Service"]
    assert [(p["targetPort"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]


def test_probes_use_the_servers_health_routes(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    container = server_container(objects["Deployment"])
    routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert {kind: p["path"] for kind, p in probes.items()} == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert {p["path"] for p in probes.values()} <= routes
    assert {p["port"] for p in probes.values()} == {"http"}
    # the token opens /healthz only: /readyz would answer 401 to the kubelet
    assert "CACE_SERVER_TOKEN" not in container_env(container)


def engine_drain_s() -> float:
    """The bound ``serve`` gives the engine to finish what it accepted, from its source."""
    found = re.findall(
        r"engine\.aclose\(drain=True, timeout=([\d.]+)\)", inspect.getsource(server_module.serve)
    )
    assert len(found) == 1, "serve() no longer drains the engine as this test expects"
    return float(found[0])


def test_grace_period_covers_the_servers_shutdown(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = server_container(objects["Deployment"])
    http = effective(container_env(container)).http
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    # server.stop_http: requests already received get request_timeout_s + 1, then open
    # connections shutdown_timeout_s; then the engine drains
    needed = pre_stop + http.request_timeout_s + 1 + http.shutdown_timeout_s + engine_drain_s()
    assert pod["terminationGracePeriodSeconds"] >= needed + GRACE_MARGIN_S


def test_pod_runs_non_root_on_a_read_only_root(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_USER
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
    container = server_container(objects["Deployment"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # TMPDIR (the transcoding pool's forkserver socket, model uploads) and HOME (CUDA
    # and torch caches) are the only places the server writes outside its settings
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert "emptyDir" in volumes[mounts["/home/cace"]["name"]]
    model = effective(container_env(container)).model.named_sources()
    for path in model.values():
        parent = next(m for m in mounts if path.startswith(m.rstrip("/") + "/"))
        assert mounts[parent]["name"] == "models" and mounts[parent].get("readOnly") is True


def test_service_links_cannot_shadow_settings(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    """Kubernetes gives every pod NAME_PORT=tcp://... for each Service NAME: a Service
    named cace-server would set CACE_SERVER_PORT."""
    _, objects = rendered
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    prefix = objects["Service"]["metadata"]["name"].upper().replace("-", "_") + "_"
    if prefix == ENV_PREFIX:
        assert pod["enableServiceLinks"] is False


def test_device_matches_the_image_and_the_gpu_request(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    directory, objects = rendered
    container = server_container(objects["Deployment"])
    settings = effective(container_env(container))
    repository, _, tag = container["image"].partition(":")
    assert repository == IMAGE_REPOSITORY
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if directory.name == "cpu":
        assert (tag, settings.engine.device, gpus) == ("cpu", "cpu", None)
    else:
        assert (tag, settings.engine.device, gpus) == ("cuda", "cuda", 1)
    assert settings.engine.torch_threads is not None  # not the node's cores / 2
    assert settings.engine.torch_threads <= float(container["resources"]["requests"]["cpu"])


def test_service_pdb_and_hpa_select_the_deployment(
    rendered: tuple[Path, dict[str, dict[str, Any]]],
) -> None:
    _, objects = rendered
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def hpa_metric() -> str:
    (metric,) = by_kind(render(K8S / "base"))["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    return str(metric["pods"]["metric"]["name"])


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == hpa_metric()
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series is not None and re.fullmatch(rule["name"]["matches"], series.group(1))
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }


def test_servicemonitor_scrapes_the_service_port() -> None:
    (monitor,) = documents(K8S / "monitoring" / "servicemonitor.yaml")
    service = by_kind(render(K8S / "base"))["Service"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in {r.path for r in health_router.routes}  # type: ignore[attr-defined]


def test_health_routes_and_the_hpa_metric_on_a_live_server() -> None:
    """The probes' paths answer 200 and /metrics exports the HPA's metric (a gauge)."""
    from cace_server.engine import Engine, EngineSettings
    from cace_server.http import BackgroundServer, HttpSettings, create_app

    model = server_module.default_model_path()
    with (
        Engine({"water": str(model)}, settings=EngineSettings(warmup=False)) as engine,
        BackgroundServer(create_app(engine, settings=HttpSettings())) as srv,
    ):
        deployment = by_kind(render(K8S / "base"))["Deployment"]
        container = server_container(deployment)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            reply = httpx.get(srv.url + container[probe]["httpGet"]["path"], timeout=30)
            assert reply.status_code == 200, (probe, reply.text)
        text = httpx.get(srv.url + "/metrics", timeout=30).text
    assert f"# TYPE {hpa_metric()} gauge" in text


# ------------------------------------------------------------------ the init container


@pytest.fixture
def model_host(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    body = b"model bytes " * 1000

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/water.safetensors", body
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_init_container_fetches_and_verifies_the_model(
    model_host: tuple[str, bytes], tmp_path: Path
) -> None:
    url, body = model_host
    deployment = by_kind(render(K8S / "overlays" / "model-from-url"))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == server_container(deployment)["image"]
    command = init["command"]
    assert command[:2] == ["python", "-c"]
    env = container_env(init)
    server_env = container_env(server_container(deployment))
    assert env["MODEL_PATH"] == server_env["CACE_SERVER_MODEL"]
    assert set(re.findall(r'os\.environ\["(\w+)"\]', command[2])) == set(env)
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["models"]
    target = tmp_path / "water.safetensors"

    def run(sha256: str) -> subprocess.CompletedProcess[str]:
        env = {"MODEL_URL": url, "MODEL_SHA256": sha256, "MODEL_PATH": str(target)}
        return subprocess.run(
            [sys.executable, "-c", command[2]], env=env, capture_output=True, text=True, timeout=60
        )

    refused = run("0" * 64)
    assert refused.returncode != 0 and "expected" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    done = run(hashlib.sha256(body).hexdigest().upper())
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == body
