"""The Kubernetes manifests in cluster/: well-formed, and consistent with the code they run.

Nothing here talks to Kubernetes: the manifests are parsed, their entrypoints, config files and the
Serve import path are resolved against this checkout (the image holds it at IMAGE_ROOT), their
configs are loaded with the pipeline's own loader, and the resources the configs ask for are checked
against what the clusters that run them can offer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from themis_ray.config import load
from themis_ray.stages.registry import STAGES, selected

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/home/ray/themis-ray"  # where cluster/Dockerfile puts this project in the image
ROW_STAGES = ("synthesize", "classify", "respond", "label", "ifd", "evaluate")


def documents() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for docs in documents().values() for d in docs if d.get("kind") == kind}


def in_image(path: str) -> Path:
    """A path inside the image -> the same file in this checkout."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under {IMAGE_ROOT}"
    return ROOT / path[len(IMAGE_ROOT) + 1:]


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "4", "16Gi") as a number."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def cluster_specs() -> dict[str, dict]:
    """Every Ray cluster spec in the manifests, by the resource that holds it."""
    specs = {f"RayCluster/{n}": d["spec"] for n, d in by_kind("RayCluster").items()}
    specs.update({f"RayJob/{n}": d["spec"]["rayClusterSpec"] for n, d in by_kind("RayJob").items()
                  if "rayClusterSpec" in d["spec"]})
    specs.update({f"RayService/{n}": d["spec"]["rayClusterConfig"] for n, d in by_kind("RayService").items()})
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    return containers[0]


def offered(group: dict) -> dict[str, float]:
    """The Ray resources one pod of the group offers: CPU, GPU and custom resources."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group)["resources"]["limits"]
    out = {"CPU": float(params.get("num-cpus", quantity(limits["cpu"]))),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    if "resources" in params:
        out.update(json.loads(json.loads(params["resources"])))  # KubeRay's quoted-JSON string
    return out


def capacity(spec: dict, resource: str) -> float:
    """How much of `resource` the cluster reaches at its largest (every worker group at maxReplicas)."""
    total = offered(spec["headGroupSpec"]).get(resource, 0)
    for group in spec.get("workerGroupSpecs", []):
        total += group["maxReplicas"] * offered(group).get(resource, 0)
    return total


def mounts(group: dict) -> set[str]:
    return {m["mountPath"] for m in ray_container(group).get("volumeMounts", [])}


def env_names(group: dict) -> set[str]:
    return {e["name"] for e in ray_container(group).get("env", [])}


def job_cluster(job: dict) -> dict:
    spec = job["spec"]
    if "clusterSelector" in spec:
        name = spec["clusterSelector"]["ray.io/cluster"]
        clusters = by_kind("RayCluster")
        assert name in clusters, f"RayJob selects RayCluster {name!r}, which no manifest defines"
        return clusters[name]["spec"]
    return spec["rayClusterSpec"]


def job_command(job: dict) -> tuple[str, str, list[str]]:
    """(job file, config path, overrides) of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    rest = argv[2:]
    assert "--config" in rest, f"{argv}: every job names its config"
    i = rest.index("--config")
    config, overrides = rest[i + 1], [a for a in rest[:i] + rest[i + 2:] if not a.startswith("--")]
    return argv[1], config, overrides


# -- well-formed ----------------------------------------------------------------------------------------


def test_every_manifest_parses_and_names_its_kind():
    docs = documents()
    assert set(docs) >= {"raycluster.yaml", "rayjob-pipeline.yaml", "rayjob-label.yaml", "rayjob-judge.yaml",
                         "rayservice-judge.yaml", "storage.yaml", "runtime-env.yaml"}
    kinds = []
    for name, items in docs.items():
        if name == "runtime-env.yaml":
            continue
        for doc in items:
            assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), name
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
            if doc["kind"].startswith("Ray"):
                assert doc["apiVersion"] == "ray.io/v1", name
            kinds.append(doc["kind"])
    assert sorted(kinds) == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]


def test_ray_clusters_autoscale_and_match_the_installed_ray():
    images = set()
    for where, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__, where
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{where}: keep work off the head"
        for name, group in groups(spec):
            images.add(ray_container(group)["image"])
            if name != "head":
                assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], (where, name)
    assert len(images) == 1, f"one image for every pod: {images}"


def test_the_long_lived_cluster_has_cpu_and_gpu_worker_groups():
    (spec,) = [d["spec"] for d in by_kind("RayCluster").values()]
    workers = spec["workerGroupSpecs"]
    assert any(offered(g)["GPU"] == 0 and offered(g)["CPU"] > 0 for g in workers), "no CPU worker group"
    assert any(offered(g)["GPU"] >= 1 for g in workers), "no GPU worker group"
    assert all(g["minReplicas"] == 0 for g in workers), "idle groups should cost nothing"


def test_resource_requests_are_sane():
    for where, spec in cluster_specs().items():
        for name, group in groups(spec):
            container = ray_container(group)
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for key in ("cpu", "memory"):
                assert key in requests and key in limits, (where, name, key)
                assert quantity(requests[key]) <= quantity(limits[key]), (where, name, key)
            assert quantity(limits["memory"]) >= 4 * 2**30, f"{where}/{name}: a Ray node needs a few GiB"
            params = group.get("rayStartParams", {})
            if "num-cpus" in params and name != "head":
                assert float(params["num-cpus"]) <= quantity(limits["cpu"]), (where, name)
            gpus = limits.get("nvidia.com/gpu")
            if gpus is not None:
                assert requests.get("nvidia.com/gpu") == gpus, f"{where}/{name}: GPUs are requested as limited"
                assert float(params.get("num-gpus", gpus)) == float(gpus), (where, name)
                assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))
            else:
                assert "num-gpus" not in params, (where, name)


def test_volumes_refer_to_the_claim_the_manifests_define():
    claims = set(by_kind("PersistentVolumeClaim"))
    for name, claim in by_kind("PersistentVolumeClaim").items():
        assert "ReadWriteMany" in claim["spec"]["accessModes"], f"{name}: pods on several nodes write the run"
    for where, spec in cluster_specs().items():
        for group_name, group in groups(spec):
            for volume in group["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims, (where, group_name)


# -- consistent with the code ---------------------------------------------------------------------------


def test_the_image_holds_what_the_manifests_run():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    for folder in ("themis_ray", "jobs", "configs", "cluster"):
        assert re.search(rf"^COPY .*\b{folder} \./{folder}$", dockerfile, re.M), folder
    assert f"ray:{ray.__version__}-" in dockerfile


def _job_module():
    spec = importlib.util.spec_from_file_location("themis_jobs_common", ROOT / "jobs" / "_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_envs_match_the_documented_one():
    job = _job_module()
    documented = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())
    assert documented["excludes"] == job.RUNTIME_ENV_EXCLUDES
    for name, rayjob in by_kind("RayJob").items():
        env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
        assert env["working_dir"] == IMAGE_ROOT, name
        assert env["excludes"] == documented["excludes"], name
        assert env.get("env_vars") == documented.get("env_vars"), name
        secrets = [k for k in env.get("env_vars", {}) if re.search(r"KEY|SECRET|PASSWORD|_TOKEN$", k)]
        assert not secrets, f"{name}: secrets in a runtime env: {secrets}"


@pytest.mark.parametrize("name", sorted(by_kind("RayJob")))
def test_rayjob_entrypoints_exist_and_their_configs_load(name):
    job = _job_module()
    rayjob = by_kind("RayJob")[name]
    script, config, overrides = job_command(rayjob)
    assert (ROOT / script).is_file(), f"{name}: entrypoint {script} does not exist"
    command = Path(script).stem
    assert command in ("pipeline", "judge") or command in STAGES, script
    assert (ROOT / config).is_file(), f"{name}: config {config} does not exist"
    cfg = load(ROOT / config, overrides)  # an unknown key or a wrong type fails here
    assert rayjob["spec"]["entrypointNumCpus"] == job.ENTRYPOINT_NUM_CPUS
    assert rayjob["spec"]["entrypointNumGpus"] == job.ENTRYPOINT_NUM_GPUS

    spec = job_cluster(rayjob)
    # The run directory is on the volume that every pod mounts.
    for group_name, group in groups(spec):
        assert any(cfg.run_dir.startswith(m + "/") for m in mounts(group)), (name, group_name, cfg.run_dir)
    stages = selected(cfg) if command == "pipeline" else [command]
    for stage in stages:
        _check_stage_fits(name, spec, cfg, stage)


def _check_stage_fits(name: str, spec: dict, cfg, stage: str) -> None:
    if stage in ROW_STAGES or stage == "judge":
        pool = cfg[stage].pool
        assert 1 <= pool.min_size <= pool.max_size, (name, stage)
        wants = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **dict(pool.resources)}
        hosts = [g for _, g in groups(spec)[1:] if all(offered(g).get(r, 0) >= v for r, v in wants.items() if v)]
        assert hosts, f"{name}: no worker group can host a {stage} actor needing {wants}"
        for resource, amount in wants.items():
            if amount:
                assert capacity(spec, resource) >= pool.max_size * amount, (
                    f"{name}: {stage}.pool.max_size={pool.max_size} actors need {pool.max_size * amount} {resource}; "
                    f"the cluster reaches {capacity(spec, resource)}")
        engines = [cfg[stage].engine] if stage != "respond" else [r.engine for r in cfg.respond.responders]
        for engine in engines:
            if engine.kind == "openai":  # the actors read the key from their pods' environment
                assert all(engine.api_key_env in env_names(g) for g in hosts), (name, stage, engine.api_key_env)
    if stage == "train":
        need = cfg.train.num_workers
        assert capacity(spec, "GPU" if cfg.train.use_gpu else "CPU") >= need, f"{name}: train needs {need} workers"
        assert (ROOT / cfg.train.deepspeed_config).is_file(), cfg.train.deepspeed_config


def test_the_label_rayjob_autoscales_from_zero_on_its_own_cluster():
    (rayjob,) = [j for j in by_kind("RayJob").values() if job_command(j)[0] == "jobs/label.py"]
    spec = rayjob["spec"]["rayClusterSpec"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    workers = spec["workerGroupSpecs"]
    assert workers and all(g["minReplicas"] == 0 and g.get("replicas", 0) == 0 for g in workers)
    _, config, overrides = job_command(rayjob)
    pool = load(ROOT / config, overrides).label.pool
    assert pool.num_cpus == 0 and pool.resources, "I/O-bound actors placed by a custom resource"
    assert pool.max_size > pool.min_size, "an actor pool that can grow"
    for resource in pool.resources:
        assert offered(spec["headGroupSpec"]).get(resource, 0) == 0, "the head must not host labeling actors"


def test_the_judge_rayjob_autoscales_gpu_workers_from_zero_and_writes_to_a_bucket():
    (rayjob,) = [j for j in by_kind("RayJob").values() if job_command(j)[0] == "jobs/judge.py"]
    spec = rayjob["spec"]["rayClusterSpec"]
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert all(g["minReplicas"] == 0 and g.get("replicas", 0) == 0 for g in spec["workerGroupSpecs"])
    _, config, overrides = job_command(rayjob)
    cfg = load(ROOT / config, overrides)
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.judge.pool.num_gpus >= 1 and offered(spec["headGroupSpec"])["GPU"] == 0
    assert cfg.judge.engine.model.startswith("/data/")  # the trained judge, on the volume every pod mounts


def serve_config() -> tuple[dict, dict]:
    (service,) = by_kind("RayService").values()
    return service, yaml.safe_load(service["spec"]["serveConfigV2"])


def test_the_serve_config_is_valid_and_its_import_path_imports(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    _, config = serve_config()
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == "themis_ray.serve.app:app_builder"
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)

    args = dict(app["args"])
    config_path = in_image(args["config"])
    assert config_path.is_file(), f"serve config {args['config']} is not in the image"
    pipeline = load(config_path)
    assert args["model"] == f"{pipeline.run_dir}/train/judge", "serve the judge the pipeline exports"
    # The same arguments build the application (with the embedded model standing in for the judge,
    # which only exists once the pipeline has run), and only with a key: it fails closed without one.
    built = {**args, "config": str(config_path), "model": "smollm2-135m-instruct"}
    monkeypatch.delenv(pipeline.serve.api_keys_env, raising=False)
    with pytest.raises(ValueError, match="refusing to serve without auth"):
        builder(built)
    monkeypatch.setenv(pipeline.serve.api_keys_env, "k1")
    assert builder(built) is not None

    from themis_ray.serve.app import JudgeAPI, JudgeModel

    names = {d["name"] for d in app.get("deployments", [])}
    assert names <= {JudgeAPI.name, JudgeModel.name}, f"unknown deployments {names}"


def test_the_service_needs_its_key_secret_on_every_pod():
    service, config = serve_config()
    (app,) = config["applications"]
    assert app["args"]["require_api_keys"] is True
    api_keys_env = load(in_image(app["args"]["config"])).serve.api_keys_env
    for group_name, group in groups(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        ref = env[api_keys_env]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is False, f"{group_name}: a missing key Secret must stop the pod, not open the judge"


def test_the_service_cluster_can_host_the_judge():
    service, config = serve_config()
    spec = service["spec"]["rayClusterConfig"]
    (app,) = config["applications"]
    mount = in_image(app["args"]["config"])
    run_dir = load(mount).run_dir
    for group_name, group in groups(spec):
        assert any(run_dir.startswith(m + "/") for m in mounts(group)), group_name
    for deployment in app["deployments"]:
        options = deployment.get("ray_actor_options", {})
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas") or deployment.get("num_replicas", 1)
        for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
            need = options.get(key, 0) * (replicas if isinstance(replicas, int) else 1)
            assert capacity(spec, resource) >= need, (deployment["name"], resource, need)


def test_the_readme_maps_every_manifest():
    readme = (CLUSTER / "README.md").read_text()
    for path in [*CLUSTER.glob("*.yaml"), *CLUSTER.glob("configs/*.yaml"), CLUSTER / "Dockerfile"]:
        assert path.relative_to(CLUSTER).as_posix() in readme, f"cluster/README.md does not mention {path.name}"
    assert "jobs/pipeline.py" in readme and "jobs/label.py" in readme and "jobs/<stage>.py" in readme
    assert "jobs/judge.py" in readme
