"""infra/kuberay/rayservice.yaml: the endpoint as a KubeRay RayService. Its embedded serve config must be what Ray's own
`ServeDeploySchema` accepts and what our serve config validation accepts (catalogue names included), with one
autoscaled deployment per base model, adapters from the MLflow server on the shared store, and API keys from a
Kubernetes secret mounted as a file on every pod (never in the file itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from core.paths import PROJECT_ROOT
from serving.config import APP_BUILDER, from_serve_config_file

pytestmark = pytest.mark.unit

RAYSERVICE = PROJECT_ROOT / "infra/kuberay/rayservice.yaml"


def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def pods(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    workers = [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    return [cluster["headGroupSpec"]["template"]["spec"], *workers]


def test_the_serve_config_is_rays_schema_and_ours() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.replica import server_options

    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    assert [app.import_path for app in schema.applications] == [APP_BUILDER]
    config = from_serve_config_file(serve_config, str(RAYSERVICE))  # our validation: fields, base models, tasks
    bases = [deployment.base_model for deployment in config.deployments]
    assert len(bases) == len(set(bases)) >= 2  # one deployment per base model
    for deployment in config.deployments:
        scaling = deployment.autoscaling
        assert scaling is not None and 1 <= scaling.min_replicas < scaling.max_replicas
        assert deployment.num_gpus >= 1 and deployment.device == "cuda"
    assert config.tracking_uri is not None and config.tracking_uri.startswith("http://")  # adapters from MLflow
    assert config.api_key is None and "key:" not in service["spec"]["serveConfigV2"]  # no secret in the file
    assert (config.host, config.port) == ("0.0.0.0", 8000)
    surge = {deployment.name: deployment.max_surge_percent for deployment in schema.applications[0].deployments}
    names = ["OpenAIIngress"] + [server_options(deployment)["name"] for deployment in config.deployments]
    # upgrades start new replicas first
    assert sorted(surge) == sorted(names) and all(surge[name] > 0 for name in names)


def test_keys_and_the_adapter_cache_are_mounted_on_every_pod() -> None:
    service = rayservice()
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    for pod in pods(service["spec"]["rayClusterConfig"]):
        secrets = {volume["name"] for volume in pod["volumes"] if "secret" in volume}
        claims = {volume["name"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume}
        mounts = [mount for container in pod["containers"] for mount in container["volumeMounts"]]
        assert any(mount["name"] in secrets and Path(args["api_keys_file"]).parent == Path(mount["mountPath"])
                   for mount in mounts)
        assert any(mount["name"] in claims and args["adapter_cache_dir"].startswith(mount["mountPath"] + "/")
                   for mount in mounts)


def test_it_runs_the_ray_version_and_image_of_the_rayjob() -> None:
    import ray

    cluster = rayservice()["spec"]["rayClusterConfig"]
    job_cluster = yaml.safe_load((PROJECT_ROOT / "infra/kuberay/rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == job_cluster["rayVersion"] == ray.__version__
    images = {container["image"] for pod in pods(cluster) for container in pod["containers"]}
    assert images == {job_cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    assert cluster["enableInTreeAutoscaling"] is True
    assert rayservice()["spec"]["upgradeStrategy"]["type"] == "NewCluster"
