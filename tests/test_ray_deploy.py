"""deploy/ray: the ``serve deploy`` config and the KubeRay RayService hold the same
application, its arguments are settings the builder knows, and the worker pods give
a replica what it asks for. Needs no Ray (the Ray-side check of the config is in
tests/test_ray_serve.py, slow suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cace_server.settings import server_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "ray"
# the replica's arguments of cace_server.ray_serve.app_builder (RAY_ARGS there)
REPLICA_ARGS = {
    "num_replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "max_ongoing_requests",
    "num_cpus",
    "num_gpus",
    "metrics_interval_s",
}


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_rayservice_serves_the_config_file() -> None:
    service = load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == load("serve_config.yaml")


def test_arguments_are_known_and_pods_fit_a_replica() -> None:
    (app,) = load("serve_config.yaml")["applications"]
    assert app["import_path"] == "cace_server.ray_serve:app_builder"
    args = app["args"]
    unknown = set(args) - REPLICA_ARGS - set(server_settings())
    assert not unknown, unknown
    assert "device" not in args

    spec = load("rayservice.yaml")["spec"]["rayClusterConfig"]
    (workers,) = spec["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == args["num_gpus"]
    assert int(limits["cpu"]) >= args["num_cpus"]
    assert workers["maxReplicas"] * int(limits["nvidia.com/gpu"]) >= args["max_replicas"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    model_dir = str(Path(args["model"]).parent)
    for pod in (head, workers):
        (c,) = pod["template"]["spec"]["containers"]
        assert c["image"] == container["image"]
        assert any(m["mountPath"] == model_dir for m in c["volumeMounts"])
        assert pod["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
