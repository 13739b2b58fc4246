"""The Kubernetes manifests and the Dockerfile: valid against the real schemas, and consistent with the serve config.

Ray objects are checked with jsonschema against the openAPIV3Schema of the served `v1` version in KubeRay's own
CRDs (v1.7.0, vendored in deploy/kubernetes/crds/). A CRD schema is "structural" OpenAPI, not plain JSON
Schema, so `closed()` first turns it into what the API server enforces:
  * objects with `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` get
    `additionalProperties: false`: the API server drops unknown fields (and kubectl's default strict field
    validation rejects them), so a misspelt field must fail here instead of vanishing silently;
  * `nullable: true` also allows null; `x-kubernetes-int-or-string` means integer or string; list-type `set`
    means unique items, and `x-kubernetes-list-map-keys` (checked by an added keyword) unique keys per item;
  * formats int32/int64 are range-checked; `x-kubernetes-embedded-resource` objects also allow apiVersion, kind
    and metadata;
  * not evaluated: `x-kubernetes-validations` (CEL rules, which need a CEL engine) and `default`.
The top-level `metadata` is `{type: object}` in a CRD because the API server checks ObjectMeta itself; it is
checked here with kubernetes-validate, as are the core objects (Service, ConfigMap) and every pod template inside
the Ray objects (wrapped in a core PodTemplate), all in strict mode (unknown fields rejected) for Kubernetes 1.33.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy.config import load_serve_config, parse_serve_config

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="core objects are checked with kubernetes-validate (pip install -e '.[test]')"
)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
CRDS = MANIFESTS / "crds"  # KubeRay v1.7.0, vendored (see its README)
K8S_VERSION = "1.33.0"  # GA gRPC probes (1.27+), sidecar containers; shipped by kubernetes-validate
CONFIG = load_serve_config(ROOT / "deploy" / "configs" / "scout-4gpu.yaml")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    [doc] = [d for d in docs(name) if d["kind"] == kind]
    return doc


ALL_DOCS = [(p.name, d) for p in sorted(MANIFESTS.glob("*.yaml")) for d in docs(p.name)]
RAY_DOCS = [(n, d) for n, d in ALL_DOCS if d["apiVersion"].startswith("ray.io/")]
CORE_DOCS = [(n, d) for n, d in ALL_DOCS if not d["apiVersion"].startswith("ray.io/")]


def closed(schema):
    """A structural CRD schema as JSON Schema that rejects what the API server rejects (see the module doc)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: (closed(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v)
        for k, v in schema.items()
        if k != "properties"
    }
    if "properties" in schema:
        out["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        if schema.get("x-kubernetes-embedded-resource"):
            out["properties"] = {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                **out["properties"],
            }
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _unique_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {item!r}")
        seen.add(key)


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_map_keys}
)


@functools.cache
def crd_schema(kind: str, version: str = "v1", close: bool = True) -> dict:
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = served["schema"]["openAPIV3Schema"]
    return closed(schema) if close else schema


def crd_errors(doc: dict, close: bool = True) -> list[str]:
    schema = crd_schema(doc["kind"], doc["apiVersion"].split("/")[1], close)
    errors = CrdValidator(schema, format_checker=FORMATS).iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


def head_container(doc: dict) -> dict:
    return pod_templates(doc)[0]["spec"]["containers"][0]


def test_the_manifests_are_a_raycluster_a_rayjob_a_service_and_a_configmap():
    assert sorted(d["kind"] for _, d in ALL_DOCS) == ["ConfigMap", "RayCluster", "RayJob", "Service"]


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_ray_objects_validate_against_the_kuberay_crd(name, doc):
    assert crd_errors(doc) == []
    assert core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}) == []  # ObjectMeta


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_pod_templates_inside_ray_objects_are_valid_core_pod_templates(name, doc):
    for template in pod_templates(doc):
        assert core_errors(as_pod_template(template)) == []


@pytest.mark.parametrize("name, doc", CORE_DOCS, ids=[n for n, _ in CORE_DOCS])
def test_core_objects_validate_strictly(name, doc):
    assert core_errors(doc) == []


def broken(mutate) -> dict:
    doc = copy.deepcopy(one("raycluster.yaml", "RayCluster"))
    mutate(doc["spec"])
    return doc


HEAD = lambda s: s["headGroupSpec"]  # noqa: E731 - short paths into a RayCluster spec for the cases below
PROBE = lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]  # noqa: E731
BROKEN_CLUSTERS = {  # what is wrong -> (mutation, the error the CRD schema must report)
    "rayStartParams value not a string": (
        lambda s: HEAD(s)["rayStartParams"].update({"num-gpus": 0}),
        "headGroupSpec/rayStartParams/num-gpus: 0 is not of type 'string'",
    ),
    "misspelt headGroupSpec field": (lambda s: HEAD(s).update(rayStartParam={}), "'rayStartParam' was unexpected"),
    "unknown auth mode": (lambda s: s.update(authOptions={"mode": "password"}), "'password' is not one of"),
    "misspelt container field": (
        lambda s: HEAD(s)["template"]["spec"]["containers"][0].update(readinesProbe={}),
        "'readinesProbe' was unexpected",
    ),
    "missing worker groupName": (
        lambda s: s["workerGroupSpecs"][0].pop("groupName"),
        "'groupName' is a required property",
    ),
    "missing head template": (lambda s: HEAD(s).pop("template"), "'template' is a required property"),
    "probe port as a string": (lambda s: PROBE(s)["grpc"].update(port="50051"), "'50051' is not of type 'integer'"),
    "probe service not a string": (lambda s: PROBE(s)["grpc"].update(service=1), "1 is not of type 'string'"),
    "probe port beyond int32": (lambda s: PROBE(s)["grpc"].update(port=2**40), "is not a 'int32'"),
    "duplicate container port": (
        lambda s: HEAD(s)["template"]["spec"]["containers"][0]["ports"].append(
            {"name": "again", "containerPort": 50051}
        ),
        "duplicate entry for list-map keys",
    ),
}


@pytest.mark.parametrize("case", BROKEN_CLUSTERS)
def test_broken_ray_objects_are_rejected_by_the_crd_schema(case):
    mutate, expected = BROKEN_CLUSTERS[case]
    errors = crd_errors(broken(mutate))
    assert any(expected in e for e in errors), errors


def test_misspelt_fields_would_pass_the_crd_schema_as_written_which_is_why_it_is_closed():
    doc = broken(lambda s: HEAD(s).update(rayStartParam={}))
    assert crd_errors(doc, close=False) == [] and crd_errors(doc) != []


@pytest.mark.parametrize("case", ["misspelt container field", "probe port as a string", "probe service not a string"])
def test_broken_pod_templates_are_rejected_by_kubernetes_validate_too(case):
    template = cluster_spec(broken(BROKEN_CLUSTERS[case][0]))["headGroupSpec"]["template"]
    assert core_errors(as_pod_template(template)) != []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["spec"]["ports"][0].update(appProtcol="grpc"),
        lambda d: d["spec"]["ports"][0].update(port="50051"),
        lambda d: d["spec"]["ports"][0].pop("port"),
    ],
    ids=["misspelt field", "port as a string", "missing port"],
)
def test_broken_services_are_rejected(mutate):
    doc = copy.deepcopy(one("service.yaml", "Service"))
    mutate(doc)
    assert core_errors(doc) != []


def test_rayjob_runs_the_raycluster_spec_and_starts_the_server():
    job, cluster = one("rayjob.yaml", "RayJob"), one("raycluster.yaml", "RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["entrypoint"] == "python -m deploy.ray_job --config /app/deploy/configs/scout-4gpu.yaml"


def test_rayjob_follows_kuberays_rules_for_sidecar_submission():
    # SidecarMode: a gateway-based readiness probe would deadlock K8sJobMode, which waits for every pod to be Ready.
    spec = one("rayjob.yaml", "RayJob")["spec"]
    assert spec["submissionMode"] == "SidecarMode"
    assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") == "Never"
    assert spec["shutdownAfterJobFinishes"] or not spec.get("ttlSecondsAfterFinished")


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_the_head_has_native_grpc_probes_on_the_gateway_port(name, doc):
    head, port = head_container(doc), CONFIG.gateway.port
    assert CONFIG.gateway.host == "0.0.0.0"  # the kubelet probes the pod IP, not localhost
    assert head["readinessProbe"]["grpc"] == {"port": port, "service": "moecluster.v1.Inference"}
    assert head["livenessProbe"]["grpc"] == {"port": port, "service": ""}
    startup = head["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > CONFIG.cluster.startup_timeout_s


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_gpu_workers_hold_one_gpu_per_actor_and_pods_have_memory_backed_shm(name, doc):
    spec = cluster_spec(doc)
    gpus = sum(
        g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for g in spec["workerGroupSpecs"]
    )
    assert gpus == CONFIG.cluster.workers + CONFIG.cluster.routers
    for template in pod_templates(doc):
        [shm] = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        for c in template["spec"]["containers"]:
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
            assert c["image"] == "moecluster:0.1.0"
    params = [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec["workerGroupSpecs"]]
    assert all(isinstance(v, str) for p in params for v in p.values())


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_ray_token_authentication_is_on_and_no_container_turns_it_off(name, doc):
    # KubeRay makes the token's Secret and sets RAY_AUTH_MODE=token + RAY_AUTH_TOKEN on every Ray container.
    spec = cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token"}
    major, minor, _ = (int(part) for part in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # token authentication arrived in Ray 2.52
    for template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert "RAY_AUTH_MODE" not in env and "RAY_AUTH_TOKEN" not in env  # KubeRay's to set, from the Secret


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=[n for n, _ in RAY_DOCS])
def test_the_service_selects_the_head_and_reaches_the_configured_ports(name, doc):
    service = one("service.yaml", "Service")
    head_labels = {**pod_templates(doc)[0]["metadata"]["labels"], "ray.io/node-type": "head"}  # KubeRay adds it
    assert service["spec"]["selector"].items() <= head_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in head_container(doc)["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["port"] == container_ports[ports["grpc"]["targetPort"]] == CONFIG.gateway.port
    assert container_ports[ports["metrics"]["targetPort"]] == CONFIG.metrics.port


def test_the_configmap_holds_the_scout_4gpu_config_where_the_entrypoint_reads_it():
    data = one("configmap.yaml", "ConfigMap")["data"]["scout-4gpu.yaml"]
    assert parse_serve_config(yaml.safe_load(data), "configmap.yaml") == CONFIG
    mounts = {m["mountPath"]: m for m in head_container(one("rayjob.yaml", "RayJob"))["volumeMounts"]}
    assert mounts["/app/deploy/configs/scout-4gpu.yaml"]["subPath"] == "scout-4gpu.yaml"


def test_the_dockerfile_builds_the_image_the_manifests_run():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    base = next(line for line in lines if line.startswith("FROM "))
    assert "cuda" in base and ("pytorch" in base or "nvcr.io" in base)
    ray_pin = re.search(r"ray\[default\]==([\d.]+)", text)[1]
    assert all(cluster_spec(d)["rayVersion"] == ray_pin for _, d in RAY_DOCS)
    assert "WORKDIR /app" in lines and "RUN pip install /app" in lines
    assert "EXPOSE 50051 9090" in lines
