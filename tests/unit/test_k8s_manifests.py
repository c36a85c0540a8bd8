"""infra/k8s, checked rather than described: the Prefect work pool's base job template rendered by prefect-kubernetes'
own job configuration (CPU and the training flow's GPU variant), and every manifest validated against a pinned
Kubernetes schema (kubernetes-validate, strict: an unknown field is an error)."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
KUBERNETES = "1.37.0"  # the schema version the manifests are validated against (kubernetes-validate ships it)


def _render(values: dict) -> dict:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((K8S / "base-job-template.json").read_text())
    make = KubernetesWorkerJobConfiguration.from_template_and_values
    cfg = asyncio.run(make(template, values)) if inspect.iscoroutinefunction(make) else make(template, values)
    return cfg.job_manifest


def _validate(resource: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_gpu_variant_renders_limits_selector_and_tolerations(prefect_harness):
    gpu = json.loads((K8S / "training-gpu.job-variables.json").read_text())
    job = _render(gpu)
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpu["gpu_count"] >= 1
    assert pod["nodeSelector"] == gpu["node_selector"] and pod["nodeSelector"]
    assert pod["tolerations"] == gpu["tolerations"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    _validate(job)


def test_cpu_default_renders_a_valid_job_without_gpus(prefect_harness):
    job = _render({})
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []
    _validate(job)


def test_the_validator_refuses_what_kubernetes_would(prefect_harness):
    """The check can fail: a pod-level field in the wrong place (what Prefect's stock template does with
    ``completions``) and a wrongly typed limit are refused."""
    import kubernetes_validate

    job = _render({})
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["completions"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["tolerations"] = "nvidia.com/gpu"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)


def test_raycluster_pod_templates_are_valid_kubernetes():
    """KubeRay's RayCluster is a custom resource (no schema in Kubernetes itself): its head and worker pod
    templates are validated as Kubernetes PodTemplates, and its own shape is checked here."""
    rc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    groups = [("head", rc["spec"]["headGroupSpec"])] + [(g["groupName"], g) for g in rc["spec"]["workerGroupSpecs"]]
    for name, group in groups:
        _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"damage-ray-{name}"},
                   "template": group["template"]})
        for c in group["template"]["spec"]["containers"]:
            assert c["resources"]["limits"]["cpu"], f"{name}: every Ray container has a CPU limit"
    for g in rc["spec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
