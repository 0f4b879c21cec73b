"""deploy/kubernetes-scaled: N replicas on a shared bucket and Redis. The manifests are
checked for what makes the set-up work (no cluster runs here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorrouter.cli.main import main as cli_main
from mirrorrouter.config import Settings, parse_settings
from tests.deploy.test_deploy import CACHE_PATH, CONFIG_PATH, PORT, ROOT

SCALED = ROOT / "deploy" / "kubernetes-scaled"
ENV = {
    "S3_ACCESS_KEY_ID": "key",
    "S3_SECRET_ACCESS_KEY": "secret",
    "REDIS_URL": "redis://redis.mirrorrouter.svc:6379/0",
    "MIRRORROUTER_ADVERTISE_URL": "http://10.1.2.3:5000",
}


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((SCALED / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((SCALED / name).read_text()):
            assert doc["metadata"].get("namespace", "mirrorrouter") == "mirrorrouter", name
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def routing(settings: Settings) -> tuple[Any, ...]:
    """What decides where a pull goes, and how it is treated upstream."""
    upstreams = {
        name: (u.aliases, u.mirrors, u.policy, u.access) for name, u in settings.upstreams.items()
    }
    return (upstreams, settings.routes, settings.default_registry, settings.allow_unconfigured)


def test_replicas_share_the_bucket_and_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = objects()
    deployment = found[("Deployment", "mirrorrouter")]["spec"]
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["type"] == "RollingUpdate"  # no volume to hand over
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    # The advertise URL is the pod's own address, composed by Kubernetes.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MIRRORROUTER_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{PORT}"
    secret_refs = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in env.values()
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    example = yaml.safe_load((SCALED / "secret.example.yaml").read_text())
    assert secret_refs <= example["stringData"].keys()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[CACHE_PATH]]  # scratch: the bucket is the cache
    # The config: valid with the environment the Deployment sets, on s3 and redis.
    text = found[("ConfigMap", "mirrorrouter-config")]["data"][Path(CONFIG_PATH).name]
    settings = parse_settings(text, env=ENV)
    assert all(u.cache.backend == "s3" for u in settings.upstreams.values())
    assert settings.coordination.backend == "redis"
    assert settings.coordination.advertise_url == "http://10.1.2.3:5000"
    redis_service = found[("Service", "redis")]["spec"]["ports"][0]["port"]
    assert f":{redis_service}/" in example["stringData"]["redis-url"]
    store = settings.cache.object_store
    assert store is not None and store.endpoint is not None
    seaweed_port = found[("Service", "seaweedfs")]["spec"]["ports"][0]["port"]
    assert store.endpoint.endswith(f":{seaweed_port}")
    # It routes what the single-replica configuration routes.
    single = parse_settings((ROOT / "deploy" / "mirrors.toml").read_text())
    assert routing(settings) == routing(single)
    config = tmp_path / "mirrors.toml"
    config.write_text(text)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["check-config", str(config)]) == 0


def test_service_and_budget_select_the_replicas() -> None:
    found = objects()
    labels = found[("Deployment", "mirrorrouter")]["spec"]["template"]["metadata"]["labels"]
    service = found[("Service", "mirrorrouter")]["spec"]
    assert service["selector"].items() <= labels.items()
    budget = found[("PodDisruptionBudget", "mirrorrouter")]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] == 1
