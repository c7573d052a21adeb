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
    sched = spec.schedule
    name = k8s_name(f"atman-{spec.name}")
    if fmt != "crontab":  # crontab submits from this machine: `atman submit` ships relative inputs itself
        check_cluster_paths(spec)
    if fmt == "crontab":
        target = address or "http://RAY_HEAD:8265"
        return (
            f"# nightly audit of job {spec.name!r}; run `crontab -e` and paste (needs atman on PATH)\n"
            f"CRON_TZ={sched.time_zone}\n"
            f"{sched.cron} cd $HOME/atman && atman submit {job_path} --audit --wait --address {target} "
            f">> $HOME/atman-{spec.name}.log 2>&1\n"
        )
    config_map = f"{name}-job"
    spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    meta = {
        "namespace": namespace,
        "labels": {"app.kubernetes.io/name": "atman-pipeline", "atman/job": k8s_name(spec.name)},
    }
    docs: list[dict] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": config_map, **meta},
            "data": {"job.yaml": spec_yaml},
        }
    ]
    if fmt == "rayjob":
        docs.append(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayJob",
                "metadata": {"name": f"{name}-run", **meta},
                "spec": rayjob_spec(spec, image, config_map, audit=False),
            }
        )
    elif fmt == "raycluster":
        docs.append(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": {"name": name, **meta},
                "spec": cluster_spec(spec, image, config_map),
            }
        )
    elif fmt == "raycronjob":
        docs.append(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayCronJob",
                "metadata": {"name": f"{name}-nightly", **meta},
                "spec": {
                    "schedule": sched.cron,
                    "timeZone": sched.time_zone,
                    "suspend": False,
                    "jobTemplate": rayjob_spec(spec, image, config_map),
                },
            }
        )
    else:
        rayjob = {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": f"{name}-{DATE}", **meta},
            "spec": rayjob_spec(spec, image, config_map, date=DATE),
        }
        account = f"{name}-scheduler"
        docs[0]["data"]["rayjob.yaml"] = yaml.safe_dump(rayjob, sort_keys=False)
        docs += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, **meta}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": account, **meta},
                "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": account, **meta},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            },
            {
                "apiVersion": "batch/v1",
                "kind": "CronJob",
                "metadata": {"name": f"{name}-nightly", **meta},
                "spec": {
                    "schedule": sched.cron,
                    "timeZone": sched.time_zone,
                    "concurrencyPolicy": "Forbid",
                    "successfulJobsHistoryLimit": 3,
                    "failedJobsHistoryLimit": 3,
                    "jobTemplate": {
                        "spec": {
                            "backoffLimit": 2,
                            "template": {
                                "spec": {
                                    "serviceAccountName": account,
                                    "restartPolicy": "Never",
                                    "containers": [
                                        {
                                            "name": "create-rayjob",
                                            "image": "bitnami/kubectl:1.31",
                                            "command": ["/bin/sh", "-c"],
                                            # the night's RayJob, named by the date: AlreadyExists on a second try
                                            "args": [
                                                f'sed "s/{DATE}/$(TZ={sched.time_zone} date +%Y-%m-%d)/g" '
                                                f"{SPEC_DIR}/rayjob.yaml | kubectl create -f -"
                                            ],
                                            "volumeMounts": [{"name": "job-spec", "mountPath": SPEC_DIR}],
                                        }
                                    ],
                                    "volumes": [{"name": "job-spec", "configMap": {"name": config_map}}],
                                }
                            },
                        }
                    },
                },
            },
        ]
    what = f"nightly audit ({sched.cron} {sched.time_zone})" if fmt in SCHEDULED else fmt
    header = f"# atman schedule {job_path} --format {fmt}: {what} of job {spec.name!r}\n"
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


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
