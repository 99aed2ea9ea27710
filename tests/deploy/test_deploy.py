"""The deployment files in deploy/: they parse, agree with each other and with the code, and
deploy/serve.yaml serves the teacher.

The last group deploys deploy/serve.yaml with the `serve run` command onto a local Ray that
this module starts once (tens of seconds on two cores). The config is changed only where this
machine needs it: no GPUs, one CPU per replica, a free port on 127.0.0.1, and the shipped
teacher's local path (or a tiny random teacher when the checkpoint is not in the checkout).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jsonschema
import pytest
import torch
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from teacher_service.checkpoint import load_teacher, save_teacher  # noqa: E402
from teacher_service.client import TeacherClient  # noqa: E402
from teacher_service.metrics import FAMILIES  # noqa: E402
from teacher_service.service_config import DEFAULT_APP_NAME, ServiceConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SHIPPED_TEACHER = REPO / "checkpoints" / "fashion_mnist_vit_teacher.safetensors"
APP_BUILDER = "teacher_service.deployment:build_app"
TEACHER_DEPLOYMENT = "TeacherDeployment"
YAML_FILES = ("serve.yaml", "cluster.yaml", "rayservice.yaml", "rayservice.template.yaml")
TINY_VIT = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
}
RUN_ID = "deploy-test"
RAY_STARTUP_WAITS = {
    "RAY_raylet_start_wait_time_s": "300",
    "RAY_agent_register_timeout_ms": "300000",
}
# A sample line of the Prometheus text format: name, optional {labels}, value.
SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? \S+$")
LABEL_NAME = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')
METRIC_IN_EXPR = re.compile(r"\b(maskedkd_[a-z0-9_]+)(\{[^}]*\})?")
BY_CLAUSE = re.compile(r"\bby \(([^)]*)\)")


def _load_yaml(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def _teacher_app(serve_config: dict[str, Any]) -> dict[str, Any]:
    apps = serve_config["applications"]
    assert len(apps) == 1, f"expected one application, found {[app['name'] for app in apps]}"
    return dict(apps[0])


def _teacher_deployment(app: dict[str, Any]) -> dict[str, Any]:
    matches = [item for item in app["deployments"] if item["name"] == TEACHER_DEPLOYMENT]
    assert len(matches) == 1, f"expected one {TEACHER_DEPLOYMENT} entry in {app['deployments']}"
    return dict(matches[0])


def _load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_rayservice", DEPLOY / "render_rayservice.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_worker_group(rayservice: dict[str, Any]) -> dict[str, Any]:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpu_groups = [
        group
        for group in groups
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert len(gpu_groups) == 1, f"expected one GPU worker group, found {len(gpu_groups)}"
    return dict(gpu_groups[0])


# -- Files parse -----------------------------------------------------------------------


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_file_parses(name: str) -> None:
    document = _load_yaml(name)
    assert isinstance(document, dict)


def test_grafana_dashboard_parses() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids)), f"duplicate panel ids in {panel_ids}"
    assert dashboard["uid"]
    assert any(variable["name"] == "run_id" for variable in dashboard["templating"]["list"])


# -- Serve config ----------------------------------------------------------------------


def test_serve_config_matches_serve_schema() -> None:
    ServeDeploySchema.model_validate(_load_yaml("serve.yaml"))


def test_serve_config_args_build_service_config() -> None:
    app = _teacher_app(_load_yaml("serve.yaml"))
    assert app["import_path"] == APP_BUILDER
    assert app["name"] == DEFAULT_APP_NAME
    config = ServiceConfig.from_dict(app["args"])
    assert config.teacher == "/models/fashion_mnist_vit_teacher.safetensors"


def test_serve_config_gives_one_gpu_per_replica() -> None:
    app = _teacher_app(_load_yaml("serve.yaml"))
    actor_options = _teacher_deployment(app)["ray_actor_options"]
    assert actor_options["num_gpus"] == 1
    # `device: auto` chooses CUDA from the args' num_gpus, so it must match the actor's.
    assert app["args"]["num_gpus"] == actor_options["num_gpus"]
    assert app["args"]["num_cpus"] == actor_options["num_cpus"]


def test_serve_config_autoscales_replicas() -> None:
    app = _teacher_app(_load_yaml("serve.yaml"))
    deployment = _teacher_deployment(app)
    autoscaling = deployment["autoscaling_config"]
    assert "num_replicas" not in deployment
    assert "num_replicas" not in app["args"]
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"]
    config = ServiceConfig.from_dict(app["args"])
    assert autoscaling["target_ongoing_requests"] <= config.ongoing_requests_limit


# -- KubeRay manifest --------------------------------------------------------------------


def test_rayservice_embeds_serve_config() -> None:
    manifest = _load_yaml("rayservice.yaml")
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == _load_yaml("serve.yaml")


def test_rayservice_is_rendered_from_template() -> None:
    rendered = _load_renderer().render_files()
    assert rendered == (DEPLOY / "rayservice.yaml").read_text(encoding="utf-8"), (
        "deploy/rayservice.yaml is out of date; run `python deploy/render_rayservice.py`"
    )


def test_render_rejects_template_without_placeholder() -> None:
    renderer = _load_renderer()
    with pytest.raises(ValueError, match="exactly one line"):
        renderer.render("apiVersion: ray.io/v1\nkind: RayService\n", "applications: []\n")


def test_render_keeps_indented_serve_config() -> None:
    template = 'kind: RayService\nspec:\n  serveConfigV2: "@serve.yaml@"\n'
    serve_text = "  # indented comment\napplications: []\n"
    rendered = _load_renderer().render(template, serve_text)
    assert yaml.safe_load(rendered)["spec"]["serveConfigV2"] == serve_text


def test_rayservice_gpu_workers_request_gpus() -> None:
    manifest = _load_yaml("rayservice.yaml")
    group = _gpu_worker_group(manifest)
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    autoscaling = _teacher_deployment(_teacher_app(_load_yaml("serve.yaml")))["autoscaling_config"]
    assert group["maxReplicas"] >= autoscaling["max_replicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayservice_mounts_teacher_folder() -> None:
    teacher = Path(_teacher_app(_load_yaml("serve.yaml"))["args"]["teacher"])
    container = _gpu_worker_group(_load_yaml("rayservice.yaml"))["template"]["spec"]["containers"][
        0
    ]
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert str(teacher.parent) in mounts
    assert mounts[str(teacher.parent)].get("readOnly") is True


# -- Cluster launcher config -----------------------------------------------------------------


def test_cluster_config_matches_launcher_schema() -> None:
    schema = json.loads((resources.files("ray.autoscaler") / "ray-schema.json").read_text())
    jsonschema.validate(_load_yaml("cluster.yaml"), schema)


def test_cluster_config_has_cpu_head_and_gpu_workers() -> None:
    cluster = _load_yaml("cluster.yaml")
    node_types = cluster["available_node_types"]
    head = node_types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [
        node
        for name, node in node_types.items()
        if name != cluster["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    ]
    assert len(gpu_workers) == 1
    autoscaling = _teacher_deployment(_teacher_app(_load_yaml("serve.yaml")))["autoscaling_config"]
    assert gpu_workers[0]["max_workers"] >= autoscaling["max_replicas"]
    assert cluster["max_workers"] >= gpu_workers[0]["max_workers"]


def test_cluster_config_syncs_teacher_folder() -> None:
    teacher = Path(_teacher_app(_load_yaml("serve.yaml"))["args"]["teacher"])
    file_mounts = _load_yaml("cluster.yaml")["file_mounts"]
    assert file_mounts[str(teacher.parent)] == "./checkpoints"
    assert file_mounts["~/serve.yaml"] == "./deploy/serve.yaml"


# -- Image ---------------------------------------------------------------------------------


def _dockerfile_lines() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    return text.replace("\\\n", " ").splitlines()


def test_images_and_ray_versions_agree() -> None:
    cluster = _load_yaml("cluster.yaml")
    manifest = _load_yaml("rayservice.yaml")
    cluster_config = manifest["spec"]["rayClusterConfig"]
    head_image = cluster_config["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    worker_image = _gpu_worker_group(manifest)["template"]["spec"]["containers"][0]["image"]
    assert head_image == worker_image == cluster["docker"]["image"]

    ray_args = [line for line in _dockerfile_lines() if line.startswith("ARG RAY_VERSION=")]
    assert len(ray_args) == 1
    assert ray_args[0].split("=", 1)[1] == cluster_config["rayVersion"]


def test_dockerfile_runs_as_non_root_with_health_check() -> None:
    lines = _dockerfile_lines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER, so the image runs as root"
    assert users[-1] not in ("root", "0")
    health_checks = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert len(health_checks) == 1
    assert any("/v1/health" in line for line in lines if line.startswith("ENV "))


def test_dockerfile_copies_no_checkpoints() -> None:
    copies = [line for line in _dockerfile_lines() if line.startswith("COPY ")]
    assert copies
    assert not [line for line in copies if "checkpoints" in line or "safetensors" in line]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    assert "*" in ignore, "the build context must start from nothing and list what it sends"
    assert not [line for line in ignore if "checkpoints" in line and line.startswith("!")]


# -- Dashboard queries against the exported metric names --------------------------------------


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def _exported_names() -> set[str]:
    names: set[str] = set()
    for family in FAMILIES:
        if family.kind == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


def test_dashboard_uses_exported_metric_names() -> None:
    exported = _exported_names()
    used = {
        match.group(1) for query in _dashboard_queries() for match in METRIC_IN_EXPR.finditer(query)
    }
    assert used, "the dashboard queries no maskedkd metric"
    assert used <= exported, f"not exported by teacher_service.metrics: {sorted(used - exported)}"


def test_dashboard_covers_every_metric_family() -> None:
    used = " ".join(_dashboard_queries())
    missing = [family.name for family in FAMILIES if family.name not in used]
    assert not missing, f"metric families with no dashboard panel: {missing}"


# -- serve.yaml deployed with `serve run` ------------------------------------------------------


@dataclass
class LiveService:
    url: str
    teacher_digest: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(condition: Callable[[], bool], description: str, timeout_s: float) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.5)


def _teacher_for_test(folder: Path) -> Path:
    if SHIPPED_TEACHER.is_file():
        return SHIPPED_TEACHER
    torch.manual_seed(0)
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=TINY_VIT)
    path = folder / "tiny.safetensors"
    save_teacher(model, spec, path)
    return path


def _cpu_serve_config(teacher: Path, port: int) -> dict[str, Any]:
    """Return deploy/serve.yaml with only the settings this machine needs changed."""
    config = copy.deepcopy(_load_yaml("serve.yaml"))
    config["http_options"] = {**config["http_options"], "host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(teacher=str(teacher), num_gpus=0, num_cpus=1, torch_threads=1)
    for deployment in app["deployments"]:
        if deployment["name"] == TEACHER_DEPLOYMENT:
            deployment["ray_actor_options"].update(num_gpus=0, num_cpus=1)
    return dict(config)


def _app_status() -> tuple[str, str]:
    app = serve.status().applications.get(DEFAULT_APP_NAME)
    if app is None:
        return "NOT_STARTED", ""
    return str(app.status.value), app.message


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    folder = tmp_path_factory.mktemp("deploy")
    teacher = _teacher_for_test(folder)
    _, spec = load_teacher(str(teacher))
    port = _free_port()
    config_path = folder / "serve.yaml"
    config_path.write_text(yaml.safe_dump(_cpu_serve_config(teacher, port)), encoding="utf-8")

    # Ray's helper processes start slowly on a busy machine, so wait longer than Ray's
    # defaults for the raylet and its agent. Ray passes RAY_* variables on to them.
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_STARTUP_WAITS.items():
            patch.setenv(name, os.environ.get(name, value))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_cli = Path(sys.executable).with_name("serve")
        gcs_address = ray.get_runtime_context().gcs_address
        deployed = subprocess.run(
            [str(serve_cli), "run", "--address", gcs_address, "--non-blocking", str(config_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert deployed.returncode == 0, f"serve run failed:\n{deployed.stdout}\n{deployed.stderr}"

        def settled() -> bool:
            return _app_status()[0] in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY")

        _wait_for(settled, f"application {DEFAULT_APP_NAME} to deploy", timeout_s=600)
        status, message = _app_status()
        assert status == "RUNNING", f"{DEFAULT_APP_NAME} is {status}: {message}"
        yield LiveService(url=f"http://127.0.0.1:{port}", teacher_digest=spec.digest)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_config_answers_ready(live_service: LiveService) -> None:
    response = httpx.get(f"{live_service.url}/v1/ready", timeout=120.0)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"


def test_serve_config_serves_the_teacher(live_service: LiveService) -> None:
    card = httpx.get(f"{live_service.url}/v1/teacher", timeout=60.0).json()
    assert card["digest"] == live_service.teacher_digest
    assert (
        card["max_batch_images"]
        == _teacher_app(_load_yaml("serve.yaml"))["args"]["max_batch_images"]
    )


def _page_labels(page: str) -> dict[str, set[str]]:
    """Map each sample name on a Prometheus text page to the label names it carries."""
    labels: dict[str, set[str]] = {}
    for line in page.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE_LINE.match(line)
        assert match is not None, f"invalid sample line on /metrics: {line!r}"
        names = labels.setdefault(match.group("name"), set())
        names.update(LABEL_NAME.findall(match.group("labels") or ""))
    return labels


def test_dashboard_queries_match_live_metrics(live_service: LiveService) -> None:
    # One served request and one rejected request, so the labelled series exist.
    with TeacherClient(live_service.url, run_id=RUN_ID, timeout_s=120.0) as client:
        card = client.info()
        height, width = card["img_size"]
        images = torch.randint(0, 256, (2, card["in_chans"], height, width), dtype=torch.uint8)
        keep = torch.arange(card["num_patches"] // 2).repeat(2, 1)
        result = client.request(images, keep)
    assert result.logits.shape == (2, card["num_classes"])
    rejected = httpx.post(
        f"{live_service.url}/v1/logits",
        content=b"x",
        headers={"Content-Type": "text/plain"},
        timeout=60.0,
    )
    assert rejected.status_code == 415

    response = httpx.get(f"{live_service.url}/metrics", timeout=60.0)
    assert response.status_code == 200, response.text
    labels = _page_labels(response.text)
    assert f'run_id="{RUN_ID}"' in response.text

    for query in _dashboard_queries():
        grouped_by = {
            name.strip() for clause in BY_CLAUSE.findall(query) for name in clause.split(",")
        }
        for match in METRIC_IN_EXPR.finditer(query):
            name, selector = match.group(1), match.group(2) or ""
            assert name in labels, f"{name} (in {query!r}) is not on the live /metrics page"
            # `job` is added by Prometheus when it scrapes, not by the service.
            expected_labels = (
                set(LABEL_NAME.findall(selector.replace("=~", "="))) | grouped_by
            ) - {"job"}
            missing = expected_labels - labels[name]
            assert not missing, f"{name} has no labels {sorted(missing)} on /metrics ({query!r})"
