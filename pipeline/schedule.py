"""``atman schedule``: the nightly audit of a job as Kubernetes / KubeRay manifests or a crontab line.

- ``raycronjob``: ConfigMap (the job spec) + KubeRay ``RayCronJob`` whose jobTemplate is a RayJob that creates a
  cluster from the job's resources (head + worker group with the GPUs), runs ``atman audit``, shuts down.
- ``cronjob``: for KubeRay without RayCronJob: a Kubernetes ``CronJob`` (concurrencyPolicy Forbid) whose pod
  creates that night's RayJob, named by the date, so a second creation the same night is refused by the API server;
  plus its ServiceAccount / Role / RoleBinding.
- ``crontab``: a line that runs ``atman submit --audit --wait`` against a running cluster.
Unscheduled, from the same pieces: ``rayjob`` (one ``atman run`` on a cluster created for it) and ``raycluster``
(a long-lived cluster to ``atman submit`` to).

Credentials: the pods read an optional Secret (``envFrom``, e.g. AWS_* keys) or use the node's / service
account's cloud role; no manifest carries a credential. KubeRay v1.7.0's RayCronJob has no concurrencyPolicy
field (the API server would prune it): the run id is the date, so a second run the same night resumes that
night's run instead of adding rows.
"""

from __future__ import annotations

import math
import re

import yaml

from pipeline.jobspec import JobSpec, JobSpecError
from pipeline.layout import is_relative_local

FORMATS = ("raycronjob", "cronjob", "crontab", "rayjob", "raycluster")
SCHEDULED = ("raycronjob", "cronjob", "crontab")
DEFAULT_IMAGE = "ghcr.io/atman-pipeline/atman:0.1.0"  # built from infra/Dockerfile
RAY_VERSION = "2.60.0"
SPEC_DIR = "/etc/atman"
DATE = "__DATE__"  # replaced by the CronJob's pod with the night's date


def k8s_name(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50] or "atman"


def _container(name: str, image: str, spec: JobSpec, *, gpus: int, cpus: float, memory: str) -> dict:
    limits = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [{"name": "ATMAN_CACHE", "value": "/tmp/atman-cache"}],
        # S3 keys, if the cluster has no cloud role: `kubectl create secret generic atman-s3 --from-literal=...`
        "envFrom": [{"secretRef": {"name": "atman-s3", "optional": True}}],
        "volumeMounts": [{"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000},
    }


def cluster_spec(spec: JobSpec, image: str, config_map: str) -> dict:
    """A RayCluster spec from the job's resources: a CPU head, one worker per actor (its GPUs, its CPUs + 1)."""
    res = spec.resources
    gpus = math.ceil(res.gpus_per_actor)
    volumes = [{"name": "job-spec", "configMap": {"name": config_map}}]
    worker_pod: dict = {
        "containers": [
            _container("ray-worker", image, spec, gpus=gpus, cpus=math.ceil(res.cpus_per_actor) + 1, memory="32Gi")
        ],
        "volumes": volumes,
    }
    if gpus:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            "rayStartParams": {"num-gpus": "0"},
            "template": {
                "spec": {
                    "containers": [_container("ray-head", image, spec, gpus=0, cpus=2, memory="8Gi")],
                    "volumes": volumes,
                }
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu" if gpus else "cpu",
                "replicas": res.actors,
                "minReplicas": res.actors,
                "maxReplicas": res.actors,
                "rayStartParams": {},
                "template": {"spec": worker_pod},
            }
        ],
    }


def rayjob_spec(spec: JobSpec, image: str, config_map: str, date: str | None = None, audit: bool = True) -> dict:
    verb = "audit" if audit else "run"
    command = f"atman {verb} {SPEC_DIR}/job.yaml --address auto" + (f" --date {date}" if date else "")
    return {
        "entrypoint": command,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 86400,  # keep the finished cluster's logs for a day
        "backoffLimit": 1,  # one retry: it resumes the same night's run id
        "rayClusterSpec": cluster_spec(spec, image, config_map),
    }


def render(spec: JobSpec, fmt: str, *, image: str = DEFAULT_IMAGE, namespace: str = "default",
           address: str | None = None, job_path: str = "JOB.yaml") -> str:  # fmt: skip
    """The manifests (multi-document YAML) or the crontab line of ``fmt`` for the job's nightly audit."""
    if fmt not in FORMATS:
        raise JobSpecError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if spec.schedule is None and fmt in SCHEDULED:
        raise JobSpecError('schedule: the job has no schedule; add e.g. schedule: {cron: "0 2 * * *", time_zone: UTC}')
    if fmt == "crontab":  # crontab submits from this machine: `atman submit` ships relative inputs itself
        return _crontab(spec, address, job_path)
    check_cluster_paths(spec)
    sched = spec.schedule
    what = f"nightly audit ({sched.cron} {sched.time_zone})" if fmt in SCHEDULED else fmt
    header = f"# atman schedule {job_path} --format {fmt}: {what} of job {spec.name!r}\n"
    return header + yaml.dump_all(_manifests(spec, fmt, image, namespace), Dumper=_Dumper, sort_keys=False)


def _crontab(spec: JobSpec, address: str | None, job_path: str) -> str:
    target = address or "http://RAY_HEAD:8265"
    return (
        f"# nightly audit of job {spec.name!r}; run `crontab -e` and paste (needs atman on PATH)\n"
        f"CRON_TZ={spec.schedule.time_zone}\n"
        f"{spec.schedule.cron} cd $HOME/atman && atman submit {job_path} --audit --wait --address {target} "
        f">> $HOME/atman-{spec.name}.log 2>&1\n"
    )


def _manifests(spec: JobSpec, fmt: str, image: str, namespace: str) -> list[dict]:
    """The Kubernetes objects of ``fmt``: the ConfigMap that holds the job spec, then what runs it."""
    name = k8s_name(f"atman-{spec.name}")
    config_map = f"{name}-job"
    meta = {
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "atman-pipeline", "atman/job": k8s_name(spec.name)},
    }
    data = {"job.yaml": yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)}
    docs = [_object("v1", "ConfigMap", config_map, meta, data=data)]
    if fmt == "rayjob":
        docs.append(
            _object("ray.io/v1", "RayJob", f"{name}-run", meta, spec=rayjob_spec(spec, image, config_map, audit=False))
        )
    elif fmt == "raycluster":
        docs.append(_object("ray.io/v1", "RayCluster", name, meta, spec=cluster_spec(spec, image, config_map)))
    elif fmt == "raycronjob":
        body = {
            "schedule": spec.schedule.cron,
            "timeZone": spec.schedule.time_zone,
            "suspend": False,
            "jobTemplate": rayjob_spec(spec, image, config_map),
        }
        docs.append(_object("ray.io/v1", "RayCronJob", f"{name}-nightly", meta, spec=body))
    else:  # cronjob: the night's RayJob travels in the ConfigMap, for the CronJob's pod to create
        rayjob = _object(
            "ray.io/v1", "RayJob", f"{name}-{DATE}", meta, spec=rayjob_spec(spec, image, config_map, date=DATE)
        )
        data["rayjob.yaml"] = yaml.safe_dump(rayjob, sort_keys=False)
        docs += _scheduler(spec, name, meta, config_map)
    return docs


def _object(api_version: str, kind: str, name: str, meta: dict, **body) -> dict:
    """One Kubernetes object: its kind, its name with the shared metadata, then ``body`` in the order given."""
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, **meta}, **body}


def _scheduler(spec: JobSpec, name: str, meta: dict, config_map: str) -> list[dict]:
    """For ``cronjob``: a Kubernetes CronJob that creates the night's RayJob, and the account allowed to create it
    (ServiceAccount, Role, RoleBinding)."""
    account = f"{name}-scheduler"
    rules = [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    subjects = [{"kind": "ServiceAccount", "name": account, "namespace": meta["namespace"]}]
    role_ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    return [
        _object("v1", "ServiceAccount", account, meta),
        _object("rbac.authorization.k8s.io/v1", "Role", account, meta, rules=rules),
        _object("rbac.authorization.k8s.io/v1", "RoleBinding", account, meta, subjects=subjects, roleRef=role_ref),
        _object("batch/v1", "CronJob", f"{name}-nightly", meta, spec=_cronjob_spec(spec, account, config_map)),
    ]


def _cronjob_spec(spec: JobSpec, account: str, config_map: str) -> dict:
    """One pod a night (never two at once) that creates the night's RayJob from the ConfigMap, named by the date:
    a second creation the same night is refused (AlreadyExists)."""
    create = {
        "name": "create-rayjob",
        "image": "bitnami/kubectl:1.31",
        "command": ["/bin/sh", "-c"],
        "args": [
            f'sed "s/{DATE}/$(TZ={spec.schedule.time_zone} date +%Y-%m-%d)/g" '
            f"{SPEC_DIR}/rayjob.yaml | kubectl create -f -"
        ],
        "volumeMounts": [{"name": "job-spec", "mountPath": SPEC_DIR}],
    }
    pod = {
        "serviceAccountName": account,
        "restartPolicy": "Never",
        "containers": [create],
        "volumes": [{"name": "job-spec", "configMap": {"name": config_map}}],
    }
    return {
        "schedule": spec.schedule.cron,
        "timeZone": spec.schedule.time_zone,
        "concurrencyPolicy": "Forbid",
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": pod}}},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded job spec) as literal blocks, readable in the manifest."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def check_cluster_paths(spec: JobSpec) -> None:
    """A scheduled job runs in pods that see neither this machine's files nor its working directory."""
    for field, path in (("input.path", spec.input.path), ("output.root", spec.output.root)):
        if is_relative_local(path):
            raise JobSpecError(
                f"{field}: {path!r} is a relative local path that the cluster's pods cannot see; "
                "use s3://bucket/prefix (or an absolute path on a volume the pods mount)"
            )
