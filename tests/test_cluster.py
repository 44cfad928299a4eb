"""The cluster files are data, so they are checked as data: each parses, passes the validator of
the tool that reads it where one exists, and every command it names is a real command whose
arguments the real parser accepts."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from ray_jobs import cli

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_yaml_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_runtime_env_uses_only_fields_ray_knows():
    from ray.runtime_env import RuntimeEnv

    env = _load(CLUSTER / "runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields
    assert RuntimeEnv(**env)["env_vars"]["OMP_NUM_THREADS"] == "1"


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(CLUSTER / "aws-gpu.yaml"))
    validate_config(config)
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in node_types.values())


def test_raycluster_has_the_fields_kuberay_requires():
    rc = _load(KUBERAY / "raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    spec = rc["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert "rayStartParams" in spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group in groups.values():
        assert {"replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in groups.values()
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(gpu_limits), "no worker group asks for nvidia.com/gpu"
    # S3 credentials reach every Ray container from the Kubernetes secret.
    secret = _load(KUBERAY / "s3-secret.example.yaml")
    pods = [spec["headGroupSpec"]] + list(groups.values())
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            assert secret["metadata"]["name"] in refs
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])


RAYJOBS = ["rayjob-train.yaml", "rayjob-infer.yaml"]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjobs_target_the_raycluster_and_are_rerun_when_they_fail(name):
    rc = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert 1 <= job["spec"]["backoffLimit"] <= 5  # reruns finish a failed job; a mistake fails a few times


def _named_commands() -> list[str]:
    """Every `groupemotion ...` or `python -m ray_jobs.commands.<job> ...` command in README.md,
    cluster/README.md and the RayJobs' entrypoints, one line each."""
    commands = []
    for path in [ROOT / "README.md", CLUSTER / "README.md"]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.split("#", 1)[0].strip()
                match = re.search(r"(groupemotion\s+\w+.*|python3? -m ray_jobs\.commands\.\w+.*)", line)
                if match and "bin/groupemotion" not in line.split()[0]:
                    commands.append(match.group(1))
    commands += [" ".join(_load(KUBERAY / name)["spec"]["entrypoint"].split()) for name in RAYJOBS]
    return commands


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "groupemotion":
        return words[1:]
    module = words[2].removeprefix("ray_jobs.commands.")
    job = {m.removeprefix("ray_jobs.commands."): name for name, (m, _) in cli.COMMANDS.items()}[module]
    return [job, *words[3:]]


def _parse(command: str) -> argparse.Namespace:
    argv = _argv(command)
    return cli.build_parser(argv).parse_args(argv)  # raises SystemExit on an unknown flag


def test_documented_commands_exist_and_parse():
    commands = _named_commands()
    assert len(commands) >= 10
    for command in commands:
        _parse(command)


def test_documented_hub_ids_are_pinned_to_a_revision_with_safetensors():
    """A hub id without `@REVISION` takes the main branch, which for facebook/hubert-base-ls960
    holds only a pickle, and is refused: a user copying the command would meet that refusal.
    timm's organisation publishes model.safetensors on the main branch of every repository."""
    from groupemotion_core.weights.pretrained import parse_hub_id

    hub_ids = []
    for command in _named_commands():
        args = _parse(command)
        for kind in ("vision", "audio"):
            source = getattr(args, f"pretrained_{kind}", None)
            if source is not None and not source.startswith(("./", "/", "~")):
                hub_ids.append((command, kind, *parse_hub_id(source, kind)))
    assert {kind for _, kind, _, _ in hub_ids} == {"vision", "audio"}
    for command, kind, repo, revision in hub_ids:
        assert revision is not None or repo.startswith("timm/"), f"{kind} hub id {repo} unpinned in: {command}"


def test_cluster_jobs_name_the_pools_an_autoscaling_cluster_grows_to():
    """Without --actors and --decode-cpus, infer and eval size their pools from the cluster as it
    is when they start, which on an autoscaling cluster that has scaled to zero is nothing."""
    cluster_text = (CLUSTER / "README.md").read_text()
    jobs = [c for c in _named_commands() if c in cluster_text or c.startswith("python -m ray_jobs.commands")]
    pooled = [_parse(c) for c in jobs if _argv(c)[0] in ("infer", "eval")]
    assert len(pooled) >= 3  # cluster/README.md's infer and eval, and the infer RayJob
    for args in pooled:
        assert args.actors and args.decode_cpus and args.gpus_per_actor == 1, args


def test_the_eval_report_on_a_cluster_goes_to_object_storage():
    reports = [_parse(c).report for c in _named_commands() if _argv(c)[0] == "eval" and "ray_jobs" in c]
    assert reports and all(r.startswith("s3://") for r in reports)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_entrypoint_answers_help(command):
    module = cli.COMMANDS[command][0]
    for argv in ([sys.executable, "-m", module, "--help"], [sys.executable, "-m", "ray_jobs.cli", command, "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_image_installs_the_package_and_the_pins_the_readme_installs():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    installs = re.findall(r"^RUN pip install (.*)$", dockerfile, flags=re.M)
    assert installs == ["-c constraints.txt ."]  # nothing installed beside the pins
    assert re.search(r"^COPY .*\bconstraints\.txt .*\./$", dockerfile, flags=re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {package.rstrip('*')} " in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"pip install (-e )?\"?\.(\[dev\])?\"? -c constraints\.txt", readme)
    assert project["project"]["name"] == "groupemotion"


def test_the_image_and_the_raycluster_run_the_pinned_ray_and_a_torch_weights_convert_accepts():
    from groupemotion_core.weights.convert import MIN_TORCH
    from torch.torch_version import TorchVersion

    pins = _pins()
    assert _load(KUBERAY / "raycluster.yaml")["spec"]["rayVersion"] == pins["ray"]
    assert TorchVersion(pins["torch"]) >= MIN_TORCH
    # torch comes from the pins, not from the base image (whose torch would be replaced or clash).
    assert re.search(r"^FROM python:3\.\d+\S*$", (CLUSTER / "Dockerfile").read_text(), flags=re.M)
