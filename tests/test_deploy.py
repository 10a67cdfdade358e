"""Offline validation of the container build and Kubernetes deployment in ``deploy/``.

Nothing here needs a cluster or a Docker engine:

* DaskJob / DaskCluster documents are checked against the CRD ``openAPIV3Schema`` shipped in the
  dask-kubernetes wheel (jsonschema), plus a check for fields the API server would silently
  prune; every pod spec inside them is also checked as a ``v1/Pod`` by kubernetes-validate;
* built-in kinds are checked with kubernetes-validate in strict mode (unknown fields rejected);
* every kustomization (base, notebook, overlays) is rendered with ``kubectl kustomize`` when
  kubectl is on PATH and the rendered documents are checked the same way;
* security: every pod meets the Pod Security "restricted" profile and more (non-root,
  read-only root filesystem, no token, resources set), scheduler Services are ClusterIP, no
  plaintext credentials anywhere in deploy/ or the pipeline files, a safe Dockerfile;
* consistency: the runner runs ``diffim-dask run`` on a pipeline that exists and that the CLI
  accepts, worker threads/memory follow the container limits, names and references resolve;
* the TLS settings of ``components/tls`` secure a real (local) Dask scheduler and worker.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WORKFLOWS = ROOT / "workflows"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
README = DEPLOY / "README.md"

#: Where the image puts the pipelines (Dockerfile `COPY workflows ...`); checked below.
IMAGE_WORKFLOWS = "/opt/diffim_dask/workflows"
#: Secrets the manifests reference but never contain: created by the operator of the site.
EXTERNAL_SECRETS = {"diffim-object-store", "diffim-dask-tls"}
DASK_KINDS = {"DaskJob", "DaskCluster"}
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
#: Volume types the Pod Security "restricted" profile allows.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _load_all(path: Path) -> list[Any]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _kustomizations() -> dict[Path, dict]:
    """Every kustomization.yaml under deploy/ (Kustomization and Component), by directory."""
    found = {}
    for path in DEPLOY.rglob("kustomization.yaml"):
        (doc,) = _load_all(path)
        found[path.parent] = doc
    return found


def _renderable_dirs() -> list[Path]:
    """Directories `kubectl kustomize` can build (Components are only built through overlays)."""
    return sorted(d for d, doc in _kustomizations().items() if doc.get("kind") != "Component")


def _resource_files() -> list[Path]:
    """Files listed under ``resources:`` of some kustomization: complete Kubernetes objects."""
    files = set()
    for directory, doc in _kustomizations().items():
        for entry in doc.get("resources", []):
            target = (directory / entry).resolve()
            if target.is_file():
                files.add(target)
    return sorted(files)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def _kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def _render(directory: Path) -> tuple[dict, ...]:
    """``kubectl kustomize DIR`` (offline), as parsed documents."""
    result = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {_rel(directory)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def _rendered(directory: Path) -> tuple[dict, ...]:
    if _kubectl() is None:
        pytest.skip("kubectl is not on PATH: kustomizations are not rendered (the source "
                    "manifests are still validated)")
    return _render(directory)


RENDERABLE = _renderable_dirs()
RESOURCE_FILES = _resource_files()
OVERLAYS = [d for d in RENDERABLE if d.parent.name == "overlays"]


def _dir_id(directory: Path) -> str:
    return str(directory.relative_to(DEPLOY))


# --------------------------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------------------------

@functools.cache
def _crd_schemas() -> dict[str, dict]:
    """openAPIV3Schema of the DaskJob and DaskCluster CRDs shipped in the dask-kubernetes wheel.

    The package is located without importing it: importing ``dask_kubernetes`` writes a config
    file into ~/.config/dask, which a test must not do.
    """
    spec = importlib.util.find_spec("dask_kubernetes")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dask-kubernetes is not installed: the CRD schemas are unavailable "
                    "(pip install dask-kubernetes)")
    package = Path(next(iter(spec.submodule_search_locations)))
    crd_dir = package / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    schemas = {}
    for name in ("daskjob", "daskcluster"):
        # The CRDs are large (~0.5 MB each): use libyaml when PyYAML has it.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((crd_dir / f"{name}.yaml").read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@functools.cache
def _kubernetes_validate():
    return pytest.importorskip("kubernetes_validate",
                               reason="kubernetes-validate is not installed (pip install "
                                      "kubernetes-validate)")


_OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations"}


def _pruned_fields(value: Any, schema: dict, path: str) -> list[str]:
    """Fields of ``value`` that a structural CRD schema does not declare.

    The API server silently drops (prunes) such fields, so a typo such as ``resource:`` for
    ``resources:`` would vanish instead of failing: report them.
    """
    problems = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                problems += _pruned_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += _pruned_fields(item, extra, f"{path}.{key}")
            elif not (schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
                      or (properties is None and extra is None)):
                problems.append(f"{path}.{key}: not in the CRD schema (the API server would "
                                f"silently drop it)")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += _pruned_fields(item, schema["items"], f"{path}[{index}]")
    return problems


def _crd_problems(doc: dict) -> list[str]:
    import jsonschema

    schema = _crd_schemas()[doc["kind"]]
    # OpenAPI 3.0 schema objects follow JSON Schema draft 4/5.
    validator = jsonschema.Draft4Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in validator.iter_errors(doc)]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    problems += _pruned_fields(body, schema, "")
    problems += [f"metadata.{k}: unexpected" for k in doc.get("metadata", {})
                 if k not in _OBJECT_META_KEYS]
    return problems


def _builtin_problems(doc: dict) -> list[str]:
    kv = _kubernetes_validate()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
    except kv.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def _pod_specs(value: Any, path: str = "") -> list[tuple[str, dict]]:
    """Every pod spec inside a document: any mapping with a ``containers`` list."""
    found = []
    if isinstance(value, dict):
        if isinstance(value.get("containers"), list):
            found.append((path or "<root>", value))
        for key, item in value.items():
            found += _pod_specs(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _pod_specs(item, f"{path}[{index}]")
    return found


def _problems(doc: dict) -> list[str]:
    """Schema problems of one Kubernetes document (CRD schema or built-in schema)."""
    if not isinstance(doc, dict) or not {"apiVersion", "kind"} <= doc.keys():
        return ["not a Kubernetes object (apiVersion and kind required)"]
    if not doc.get("metadata", {}).get("name"):
        return ["metadata.name missing"]
    if doc["kind"] in DASK_KINDS:
        problems = _crd_problems(doc)
        # The CRDs embed the Kubernetes 1.21 PodSpec and allow unknown fields nowhere; check
        # each pod spec against the current Pod schema as well.
        for where, pod in _pod_specs(doc["spec"]):
            as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
                      "spec": pod}
            problems += [f"{where}: {p}" for p in _builtin_problems(as_pod)]
        return problems
    return _builtin_problems(doc)


def _assert_valid(docs, where: str) -> None:
    report = []
    for doc in docs:
        label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}" \
            if isinstance(doc, dict) else repr(doc)[:40]
        report += [f"{where}: {label}: {p}" for p in _problems(doc)]
    assert not report, "\n".join(report)


# --------------------------------------------------------------------------------------------
# Security checks
# --------------------------------------------------------------------------------------------

def _security_problems(pod: dict) -> list[str]:
    """Pod Security "restricted" profile, plus this project's rules."""
    problems = []
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{flag} is set")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    if pod.get("serviceAccountName", "default") == "default":
        problems.append("runs as the namespace's default ServiceAccount")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: type {sorted(kinds)} not allowed "
                            f"(hostPath and the like)")
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    for container in containers:
        name = container.get("name", "?")
        context = container.get("securityContext", {})

        def effective(key, context=context):
            return context.get(key, pod_context.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            problems.append(f"{name}: runAsUser is 0 (root)")
        seccomp = effective("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no RuntimeDefault/Localhost seccomp profile")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if capabilities.get("add"):
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind, {}))
            if missing:
                problems.append(f"{name}: no {kind} for {sorted(missing)}")
        image = container.get("image", "")
        if not image or image.endswith(":latest") or ("@" not in image
                                                      and ":" not in image.rsplit("/", 1)[-1]):
            problems.append(f"{name}: image {image!r} is not pinned to a tag or digest")
    return problems


def _all_security_problems(docs) -> list[str]:
    report = []
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        for where, pod in _pod_specs(doc.get("spec", {})):
            report += [f"{label} {where}: {p}" for p in _security_problems(pod)]
        if doc["kind"] == "Service" and doc.get("spec", {}).get("type", "ClusterIP") \
                != "ClusterIP":
            report.append(f"{label}: Service type {doc['spec']['type']} exposes it outside "
                          f"the cluster")
        if doc["kind"] in ("Ingress", "Route", "Gateway", "HTTPRoute"):
            report.append(f"{label}: exposes services outside the cluster")
        if doc["kind"] in DASK_KINDS:
            cluster = doc["spec"]["cluster"]["spec"] if doc["kind"] == "DaskJob" \
                else doc["spec"]
            service = cluster["scheduler"].get("service", {})
            if service.get("type") != "ClusterIP":
                report.append(f"{label}: scheduler Service type is {service.get('type')!r}, "
                              f"not ClusterIP")
    return report


# --------------------------------------------------------------------------------------------
# Plaintext credential scan (manifests, pipeline files, Dockerfile)
# --------------------------------------------------------------------------------------------

_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey",
                 "api_key", "api-key", "accesskey", "access_key", "privatekey", "private_key")
#: Keys that name or point to a secret rather than hold one (secretKeyRef, secretName, ...).
_REFERENCE_SUFFIXES = ("ref", "name", "names", "path", "file", "dir", "mode", "type")
_CREDENTIAL_VALUES = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "a Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "a JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\."),
}


def _secret_like(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith(_REFERENCE_SUFFIXES):
        return False
    # A bare "key" is not flagged: Kubernetes uses it for names (secretKeyRef.key,
    # tolerations[].key); s3fs-style {key, secret} pairs are caught by "secret".
    return lowered == "pass" or any(word in lowered for word in _SECRET_WORDS)


def _harmless_value(value: str) -> bool:
    """Empty, a file path (a mounted Secret) or a reference to another variable."""
    stripped = value.strip()
    return (not stripped or stripped.startswith("/") or bool(re.fullmatch(
        r"\$\(\w+\)|\$\{\w+\}|\$\w+", stripped)))


def find_plaintext_secrets(value: Any, where: str = "") -> list[str]:
    """Credential-looking literals in a parsed YAML document: ``where: what`` for each.

    Flags Secret objects carrying data, environment variables and mapping keys with
    secret-like names holding literal strings, and values shaped like well-known credentials.
    References (``secretKeyRef``, ``secretName``, mounted file paths) are not flagged.
    """
    found = []
    if isinstance(value, dict):
        if value.get("kind") == "Secret" and (value.get("data") or value.get("stringData")):
            found.append(f"{where or '<root>'}: a Secret with data in a manifest")
        if isinstance(value.get("name"), str) and isinstance(value.get("value"), str) \
                and _secret_like(value["name"]) and not _harmless_value(value["value"]):
            found.append(f"{where}: environment variable {value['name']} has a literal value")
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(item, str) and _secret_like(str(key)) and not _harmless_value(item):
                found.append(f"{here}: literal value under a secret-like key")
            found += find_plaintext_secrets(item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += find_plaintext_secrets(item, f"{where}[{index}]")
    elif isinstance(value, str):
        for what, pattern in _CREDENTIAL_VALUES.items():
            if pattern.search(value):
                found.append(f"{where}: looks like {what}")
    return found


# --------------------------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------------------------

def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _stages(instructions) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker's build-context filter drops ``path`` (relative, '/'-separated).

    Docker semantics: patterns apply in order and the last match wins; a pattern matching a
    parent directory matches everything below it; ``!`` re-includes; ``**`` spans directories.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex += "(.*/)?"
                index += 3
            elif pattern.startswith("**", index):
                regex += ".*"
                index += 2
            elif pattern[index] == "*":
                regex += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                regex += "[^/]"
                index += 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex += pattern[index:end + 1]
                index = end + 1
            else:
                regex += re.escape(pattern[index])
                index += 1
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# --------------------------------------------------------------------------------------------
# Helpers over rendered documents
# --------------------------------------------------------------------------------------------

def _containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(role, pod spec, container) for every container of a DaskJob/DaskCluster."""
    if doc["kind"] == "DaskJob":
        pods = [("runner", doc["spec"]["job"]["spec"])]
        cluster = doc["spec"]["cluster"]["spec"]
    else:
        pods = []
        cluster = doc["spec"]
    pods += [("worker", cluster["worker"]["spec"]), ("scheduler", cluster["scheduler"]["spec"])]
    return [(role, pod, container) for role, pod in pods for container in pod["containers"]]


def _env(container: dict, config_maps: dict[str, dict]) -> dict[str, Any]:
    """The container's environment: envFrom ConfigMaps first, then env (which wins)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps.get(source["configMapRef"]["name"], {}).get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def _by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _parse_quantity(text: str) -> float:
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20,
                "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1.0) if match.group(2) \
        else float(match.group(1))


# ============================================================================================
# Tests: inventory
# ============================================================================================

def test_every_yaml_file_parses_and_is_used():
    """Every YAML file under deploy/ parses and is part of some kustomization."""
    assert RENDERABLE, "no kustomization found under deploy/"
    referenced = set(RESOURCE_FILES)
    for directory, doc in _kustomizations().items():
        assert doc.get("kind") in KUSTOMIZE_KINDS, f"{_rel(directory)}: kind {doc.get('kind')}"
        referenced.add((directory / "kustomization.yaml").resolve())
    orphans = [_rel(p) for p in _yaml_files() if p.resolve() not in referenced]
    assert not orphans, f"YAML files not used by any kustomization: {orphans}"
    for path in _yaml_files():
        assert _load_all(path), f"{_rel(path)} is empty"
    expected = {"base", "notebook", "overlays/local", "overlays/production"}
    assert expected <= {_dir_id(d) for d in RENDERABLE}


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_source_manifest_validates(path):
    """Each manifest file, as written, against the CRD or Kubernetes schema (no kubectl)."""
    _assert_valid(_load_all(path), _rel(path))


@pytest.mark.parametrize("path", RESOURCE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_source_manifest_is_secure(path):
    report = _all_security_problems(_load_all(path))
    assert not report, "\n".join(report)


# ============================================================================================
# Tests: rendered kustomizations
# ============================================================================================

@pytest.mark.parametrize("directory", RENDERABLE, ids=_dir_id)
def test_rendered_kustomization_validates(directory):
    docs = _rendered(directory)
    assert docs, f"{_rel(directory)} renders nothing"
    _assert_valid(docs, _rel(directory))


@pytest.mark.parametrize("directory", RENDERABLE, ids=_dir_id)
def test_rendered_kustomization_is_secure(directory):
    report = _all_security_problems(_rendered(directory))
    report += find_plaintext_secrets(list(_rendered(directory)), _rel(directory))
    assert not report, "\n".join(report)


@pytest.mark.parametrize("directory", OVERLAYS, ids=_dir_id)
def test_overlay_sets_namespace_and_image(directory):
    """Overlays put everything in one namespace and replace the base's image reference."""
    docs = _rendered(directory)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    (namespace,) = namespaces
    for binding in _by_kind(docs, "RoleBinding").values():
        for subject in binding["subjects"]:
            if subject["kind"] == "ServiceAccount":
                assert subject.get("namespace"), f"RoleBinding subject {subject} lacks namespace"
    declared = _by_kind(docs, "Namespace")
    if declared:
        assert set(declared) == {namespace}
        labels = declared[namespace]["metadata"].get("labels", {})
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted"
    base_images = {c["image"] for d in _render_base_dask() for *_, c in _containers(d)}
    images = {c["image"] for d in docs if d["kind"] in DASK_KINDS for *_, c in _containers(d)}
    assert len(images) == 1, f"one image for all Dask containers expected, got {images}"
    assert not images & base_images, f"{_rel(directory)} keeps the base image {images}"


def _render_base_dask() -> list[dict]:
    docs = list(_render(DEPLOY / "base")) + list(_render(DEPLOY / "notebook"))
    return [d for d in docs if d["kind"] in DASK_KINDS]


@pytest.mark.parametrize("directory", RENDERABLE, ids=_dir_id)
def test_dask_clusters_are_internal_and_consistent(directory):
    """Scheduler Service: ClusterIP, selects this cluster's scheduler, targets named ports."""
    docs = [d for d in _rendered(directory) if d["kind"] in DASK_KINDS]
    for doc in docs:
        name = doc["metadata"]["name"]
        cluster = doc["spec"]["cluster"]["spec"] if doc["kind"] == "DaskJob" else doc["spec"]
        service = cluster["scheduler"]["service"]
        assert service["type"] == "ClusterIP"
        assert service["selector"] == {"dask.org/cluster-name": name,
                                       "dask.org/component": "scheduler"}, service["selector"]
        (scheduler,) = cluster["scheduler"]["spec"]["containers"]
        named_ports = {p["name"]: p["containerPort"] for p in scheduler["ports"]}
        assert {p["targetPort"] for p in service["ports"]} <= named_ports.keys()
        assert named_ports["tcp-comm"] == 8786
        assert scheduler["command"] == ["dask", "scheduler"]
        assert "--port" in scheduler["args"]
        assert scheduler["args"][scheduler["args"].index("--port") + 1] == "8786"
        assert scheduler["readinessProbe"]["httpGet"]["port"] in named_ports


@pytest.mark.parametrize("directory", RENDERABLE, ids=_dir_id)
def test_workers_use_their_limits(directory):
    """Worker threads = whole CPU limit, --memory-limit = memory limit (downward API), and
    requests == limits (Guaranteed QoS: workers are the last pods evicted)."""
    docs = [d for d in _rendered(directory) if d["kind"] in DASK_KINDS]
    for doc in docs:
        for role, _pod, container in _containers(doc):
            if role != "worker":
                continue
            args = container["args"]
            assert container["command"] == ["dask", "worker"]
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], resources
            cpu = _parse_quantity(resources["limits"]["cpu"])
            assert cpu >= 1 and cpu == int(cpu), f"CPU limit {cpu} is not whole cores"
            env = {e["name"]: e for e in container["env"]}
            for flag, resource in (("--nthreads", "limits.cpu"),
                                   ("--memory-limit", "limits.memory")):
                value = args[args.index(flag) + 1]
                variable = re.fullmatch(r"\$\((\w+)\)", value).group(1)
                field = env[variable]["valueFrom"]["resourceFieldRef"]
                assert field["resource"] == resource
                assert field["containerName"] == container["name"]
                assert str(field.get("divisor", "1")) == "1"
            assert args[args.index("--name") + 1] == "$(DASK_WORKER_NAME)"
            local = args[args.index("--local-directory") + 1]
            assert local in {m["mountPath"] for m in container["volumeMounts"]}, \
                "the spill directory must be a mounted (writable) volume"


@pytest.mark.parametrize("directory", RENDERABLE, ids=_dir_id)
def test_references_resolve(directory):
    """Mounted volumes exist; ServiceAccounts, PVCs and ConfigMaps are created by this
    kustomization or by the base; Secrets are the documented external ones; files named in
    the environment (TLS certificates) lie under a mounted volume."""
    docs = _rendered(directory)
    base = _render(DEPLOY / "base")
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    from_base = {(d["kind"], d["metadata"]["name"]) for d in base}
    config_maps = _by_kind(docs, "ConfigMap")
    problems = []
    for doc in docs:
        for where, pod in _pod_specs(doc.get("spec", {})):
            label = f"{doc['kind']}/{doc['metadata']['name']} {where}"
            account = ("ServiceAccount", pod.get("serviceAccountName", "default"))
            if account not in defined | from_base:
                problems.append(f"{label}: ServiceAccount {account[1]} is never created")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for volume in volumes.values():
                if "persistentVolumeClaim" in volume:
                    claim = ("PersistentVolumeClaim",
                             volume["persistentVolumeClaim"]["claimName"])
                    if claim not in defined | from_base:
                        problems.append(f"{label}: PVC {claim[1]} is never created")
                if "secret" in volume and volume["secret"]["secretName"] not in EXTERNAL_SECRETS:
                    problems.append(f"{label}: undocumented Secret {volume['secret']}")
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                for mount_path, name in mounts.items():
                    if name not in volumes:
                        problems.append(f"{label}: {container['name']} mounts unknown volume "
                                        f"{name}")
                for source in container.get("envFrom", []):
                    if "configMapRef" in source and ("ConfigMap", source["configMapRef"]["name"]) \
                            not in defined:
                        problems.append(f"{label}: ConfigMap {source['configMapRef']} missing")
                    if "secretRef" in source and source["secretRef"]["name"] \
                            not in EXTERNAL_SECRETS:
                        problems.append(f"{label}: undocumented Secret {source['secretRef']}")
                for key, value in _env(container, config_maps).items():
                    if isinstance(value, str) and re.search(r"(_FILE|__CERT|__KEY)$", key):
                        if not any(value.startswith(p.rstrip("/") + "/") for p in mounts):
                            problems.append(f"{label}: {container['name']} {key}={value} is not "
                                            f"on a mounted volume")
    assert not problems, "\n".join(problems)


# ============================================================================================
# Tests: the survey runner
# ============================================================================================

def _cli_run_parser():
    """The ``run`` sub-parser of the real CLI, or None while it does not exist yet."""
    import argparse

    from diffim_dask.cli import build_parser

    parser = build_parser()
    for action in parser._actions:  # argparse exposes sub-parsers only through _actions
        if isinstance(action, argparse._SubParsersAction) and "run" in action.choices:
            return parser
    return None


def _runner_commands() -> list[tuple[str, dict, list[str]]]:
    """(where, runner pod spec, command+args) of every DaskJob, as written and as rendered."""
    found = []
    sources: list[tuple[str, list[dict]]] = [(_rel(p), _load_all(p)) for p in RESOURCE_FILES]
    if _kubectl():
        sources += [(_rel(d), list(_render(d))) for d in RENDERABLE]
    for where, docs in sources:
        for doc in docs:
            if doc.get("kind") == "DaskJob":
                pod = doc["spec"]["job"]["spec"]
                (runner,) = pod["containers"]
                found.append((where, pod, runner.get("command", []) + runner.get("args", [])))
    return found


def test_runner_runs_the_survey_and_restarts_safely():
    commands = _runner_commands()
    assert commands, "no DaskJob found"
    for where, pod, argv in commands:
        assert argv[:2] == ["diffim-dask", "run"], f"{where}: runner runs {argv}"
        assert argv[2].startswith(IMAGE_WORKFLOWS + "/") and argv[2].endswith(".yaml"), \
            f"{where}: pipeline {argv[2]} is not one of the image's {IMAGE_WORKFLOWS}"
        for option in ("--manifest", "--templates", "--out"):
            assert option in argv and not argv[argv.index(option) + 1].startswith("-"), \
                f"{where}: {option} missing"
        assert "--scheduler" not in argv and "--workers" not in argv, \
            f"{where}: the runner must use its DaskJob's cluster (DASK_SCHEDULER_ADDRESS)"
        # A restarted runner continues where it stopped; the whole run is bounded in time.
        assert "--resume" in argv, f"{where}: restarts would redo finished work"
        assert pod["restartPolicy"] == "OnFailure", where
        assert pod["activeDeadlineSeconds"] >= 3600, where


def test_runner_pipelines_exist_and_are_installed():
    if not sorted(WORKFLOWS.glob("*.yaml")):
        pytest.skip("workflows/*.yaml do not exist yet: pipeline names cannot be checked")
    missing = {}
    for where, _pod, argv in _runner_commands():
        name = argv[2][len(IMAGE_WORKFLOWS) + 1:]
        if not (WORKFLOWS / name).is_file():
            missing[where] = name
    assert not missing, f"runner pipelines not in workflows/: {missing}"


def test_runner_arguments_are_accepted_by_the_cli():
    """The real ``diffim-dask`` parser accepts each runner command and keeps URLs intact."""
    parser = _cli_run_parser()
    if parser is None:
        pytest.skip("diffim-dask has no `run` sub-command yet")
    for where, _pod, argv in _runner_commands():
        try:
            namespace = parser.parse_args(argv[1:])
        except SystemExit as exc:  # argparse reports the reason on stderr
            pytest.fail(f"{where}: `diffim-dask` rejects {argv[1:]} (exit {exc.code})")
        values = {str(v) for v in vars(namespace).values() if v is not None}
        for option in ("--manifest", "--templates", "--out"):
            given = argv[argv.index(option) + 1]
            assert given in values, (f"{where}: {option} {given} was changed by the CLI's "
                                     f"parser (an fsspec URL must reach fsspec unchanged)")


# ============================================================================================
# Tests: TLS and network policy in production
# ============================================================================================

def test_production_uses_tls_object_store_and_network_policy():
    docs = _rendered(DEPLOY / "overlays" / "production")
    config_maps = _by_kind(docs, "ConfigMap")
    (job,) = _by_kind(docs, "DaskJob").values()
    name = job["metadata"]["name"]
    assert not _by_kind(docs, "PersistentVolumeClaim"), "production reads the object store"
    for role, pod, container in _containers(job):
        env = _env(container, config_maps)
        assert env.get("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION") == "True", role
        assert env.get("DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME") == "tls", role
        assert env.get("DASK_DISTRIBUTED__COMM__TLS__CA_FILE"), role
        if role != "scheduler":
            # The operator would inject tcp://...; ours names this cluster's scheduler Service.
            assert env.get("DASK_SCHEDULER_ADDRESS") == f"tls://{name}-scheduler:8786", role
            secret_refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
            assert secret_refs == [{"name": "diffim-object-store", "optional": False}], role
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"]), role
    argv = job["spec"]["job"]["spec"]["containers"][0]["args"]
    for option in ("--manifest", "--templates", "--out"):
        assert argv[argv.index(option) + 1].startswith("s3://"), option
    (policy,) = _by_kind(docs, "NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": name}
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_local_overlay_keeps_the_data_volume_single_node():
    docs = _rendered(DEPLOY / "overlays" / "local")
    (claim,) = _by_kind(docs, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (job,) = _by_kind(docs, "DaskJob").values()
    for role, pod, container in _containers(job):
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        if role != "scheduler":
            assert mounts.get("data") == "/data", role


# ============================================================================================
# Tests: no credentials anywhere
# ============================================================================================

def test_no_plaintext_secrets_in_deploy_or_pipelines():
    files = _yaml_files() + sorted(WORKFLOWS.glob("*.yaml")) + sorted(WORKFLOWS.glob("*.yml"))
    report = []
    for path in files:
        report += find_plaintext_secrets(_load_all(path), _rel(path))
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in (".yaml", ".yml"):
            text = path.read_text()
            report += [f"{_rel(path)}: looks like {what}"
                       for what, pattern in _CREDENTIAL_VALUES.items() if pattern.search(text)]
    assert not report, "\n".join(report)


@pytest.mark.parametrize("document, expected", [
    ({"env": [{"name": "AWS_SECRET_ACCESS_KEY",
               "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}]}, "AWS_SECRET_ACCESS_KEY"),
    ({"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"}]},
     "AWS access key id"),
    ({"storage_options": {"key": "minio", "secret": "minio123"}}, "secret-like key"),
    ({"output": "s3://survey:hunter2@minio.example.org/bucket"}, "password in a URL"),
    ({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
      "stringData": {"AWS_SECRET_ACCESS_KEY": "x"}}, "Secret with data"),
    ({"tls": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----"},
     "private key"),
    ({"db_password": "correct horse"}, "secret-like key"),
], ids=["env-literal", "aws-key-id", "storage-options", "url-password", "secret-object",
        "private-key", "password-key"])
def test_secret_scan_catches_plaintext_credentials(document, expected):
    found = find_plaintext_secrets(document)
    assert any(expected in f for f in found), found


def test_secret_scan_accepts_references():
    document = {
        "env": [{"name": "AWS_SECRET_ACCESS_KEY",
                 "valueFrom": {"secretKeyRef": {"name": "diffim-object-store",
                                                "key": "AWS_SECRET_ACCESS_KEY"}}},
                {"name": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
                 "value": "/etc/diffim-dask/tls/tls.key"},
                {"name": "TOKEN", "value": "$(MOUNTED_TOKEN)"}],
        "envFrom": [{"secretRef": {"name": "diffim-object-store", "optional": True}}],
        "volumes": [{"name": "t", "secret": {"secretName": "diffim-dask-tls"}}],
        "automountServiceAccountToken": False,
        "out": "s3://bucket/prefix/output",
    }
    assert find_plaintext_secrets(document) == []


# ============================================================================================
# Tests: the checks reject what they should (negative cases)
# ============================================================================================

def _base_job() -> dict:
    (doc,) = _load_all(DEPLOY / "base" / "daskjob.yaml")
    return doc


def test_crd_schema_rejects_wrong_types():
    doc = _base_job()
    doc["spec"]["cluster"]["spec"]["worker"]["replicas"] = "two"
    problems = _crd_problems(doc)
    assert any("replicas" in p and "'two' is not of type 'integer'" in p for p in problems), \
        problems
    doc = _base_job()
    # An unquoted CPU count is an integer, but the CRD wants a quantity string.
    doc["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"] = 2
    assert any("limits.cpu" in p for p in _crd_problems(doc)), _crd_problems(doc)


def test_crd_check_reports_fields_the_api_server_would_prune():
    doc = _base_job()
    container = doc["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo jsonschema alone accepts
    problems = _crd_problems(doc)
    assert any("containers[0].resource:" in p and "drop" in p for p in problems), problems
    # The nested pod spec is also checked as a v1/Pod, strictly:
    assert any("resource" in p for p in _problems(doc))


def test_builtin_validation_rejects_bad_objects():
    (claim,) = _load_all(DEPLOY / "base" / "pvc.yaml")
    broken = copy.deepcopy(claim)
    broken["spec"]["accessModes"] = "ReadWriteMany"
    assert _builtin_problems(broken)
    broken = copy.deepcopy(claim)
    broken["spec"]["storageClass"] = "fast"  # the field is storageClassName
    assert _builtin_problems(broken)
    assert _builtin_problems(claim) == []


def test_security_check_catches_unsafe_pods():
    doc = _base_job()
    assert _all_security_problems([doc]) == []
    worker_pod = doc["spec"]["cluster"]["spec"]["worker"]["spec"]
    container = worker_pod["containers"][0]
    container["securityContext"]["privileged"] = True
    container["securityContext"]["runAsUser"] = 0
    del container["securityContext"]["capabilities"]
    worker_pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    worker_pod["hostNetwork"] = True
    doc["spec"]["cluster"]["spec"]["scheduler"]["service"]["type"] = "LoadBalancer"
    report = "\n".join(_all_security_problems([doc]))
    for expected in ("privileged", "runAsUser is 0", "drop ALL", "hostPath", "hostNetwork",
                     "not ClusterIP"):
        assert expected in report, (expected, report)


# ============================================================================================
# Tests: the Dockerfile
# ============================================================================================

def dockerfile_problems(text: str) -> list[str]:
    """Safety problems of a Dockerfile: root user, ADD, secret-like ENV/ARG, curl | sh."""
    instructions = _dockerfile_instructions(text)
    stages = _stages(instructions)
    if not stages:
        return ["no FROM"]
    problems = []
    users = [v for k, v in stages[-1] if k == "USER"]
    uid = users[-1].split(":")[0] if users else ""
    if not (uid.isdigit() and int(uid) > 0):
        problems.append(f"final stage runs as {users[-1] if users else 'root (no USER)'}: use a "
                        f"fixed non-zero UID")
    for keyword, value in instructions:
        if keyword == "ADD":
            problems.append(f"ADD {value}: use COPY (ADD fetches URLs and unpacks archives)")
        if keyword in ("ENV", "ARG"):
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", value):
                if _secret_like(name):
                    problems.append(f"{keyword} {name}: secrets do not belong in an image "
                                    f"(they stay in its history)")
        if keyword == "RUN" and re.search(r"\b(curl|wget)\b.*\|\s*(ba)?sh", value):
            problems.append(f"RUN pipes a download into a shell: {value}")
    if not [k for k, _ in stages[-1] if k == "WORKDIR"]:
        problems.append("no WORKDIR in the final stage")
    return problems


def test_dockerfile_is_safe():
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    instructions = _dockerfile_instructions(text)
    final = _stages(instructions)[-1]
    base = [v for k, v in instructions if k == "ARG" and v.startswith("PYTHON_IMAGE=")]
    assert base == ["PYTHON_IMAGE=python:3.11-slim"], base
    assert [v for k, v in final if k == "ENTRYPOINT"] == ['["diffim-dask"]']
    # The manifests run as the image's user.
    uid = int([v for k, v in final if k == "USER"][-1].split(":")[0])
    run_as = {pod.get("securityContext", {}).get("runAsUser")
              for path in RESOURCE_FILES for doc in _load_all(path)
              for _, pod in _pod_specs(doc.get("spec", {}))}
    assert run_as == {uid}, f"manifests run as {run_as}, the image as {uid}"


def test_dockerfile_check_catches_unsafe_images():
    unsafe = ("FROM python:3.11-slim\n"
              "ENV AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI \\\n    OTHER=1\n"
              "ADD https://example.org/tool.tar.gz /opt/\n"
              "RUN curl -sSL https://example.org/install | sh\n"
              "USER root\n")
    report = "\n".join(dockerfile_problems(unsafe))
    for expected in ("runs as root", "ADD https://", "ENV AWS_SECRET_ACCESS_KEY", "RUN pipes",
                     "no WORKDIR"):
        assert expected in report, (expected, report)
    assert "runs as root (no USER)" in "\n".join(dockerfile_problems("FROM scratch\n"))


def test_dockerfile_copies_what_the_context_provides():
    """COPY sources exist in the repository and pass the build-context filter; local data,
    environments and VCS metadata do not; the pipelines land where the runner expects them."""
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    patterns = _dockerignore_patterns()
    copies = [v.split() for k, v in instructions if k == "COPY" and "--from" not in v]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            probe = next((p for p in sorted(path.rglob("*.py"))), path) if path.is_dir() \
                else path
            relative = str(probe.relative_to(ROOT))
            assert not _dockerignore_excludes(relative, patterns), \
                f"COPY {source}: {relative} is excluded by {DOCKERIGNORE.name}"
    for private in (".git/config", ".venv/bin/python", "tests/test_core.py",
                    "benchmarks/results/run.json", "diffim_dask/__pycache__/cli.cpython-311.pyc",
                    "diffim-demo/manifest.yaml", "workflows/.ipynb_checkpoints/x.ipynb",
                    "deploy/tls.key", ".env"):
        assert _dockerignore_excludes(private, patterns), f"{private} reaches the build context"
    destinations = {c[-1] for c in copies if c[0] == "workflows"}
    assert destinations == {IMAGE_WORKFLOWS}, destinations


def test_dockerignore_matcher_follows_docker_rules():
    patterns = ["*", "!src/", "**/__pycache__", "!keep.md"]
    assert _dockerignore_excludes("notes.txt", patterns)
    assert not _dockerignore_excludes("src/a/b.py", patterns)
    assert _dockerignore_excludes("src/a/__pycache__/b.pyc", patterns)
    assert not _dockerignore_excludes("keep.md", patterns)
    assert _dockerignore_excludes("other/keep.md", patterns)


# ============================================================================================
# Tests: documentation and lint
# ============================================================================================

def test_readme_documents_the_deployment():
    text = README.read_text()
    for needed in ("docker build -f deploy/Dockerfile", "helm install", "kubectl apply -k",
                   "DASK_SCHEDULER_ADDRESS", *sorted(EXTERNAL_SECRETS)):
        assert needed in text, f"deploy/README.md does not mention {needed!r}"
    for directory in RENDERABLE:
        assert _dir_id(directory) in text, f"deploy/README.md does not mention {_dir_id(directory)}"


def test_yamllint():
    pytest.importorskip("yamllint", reason="yamllint is not installed (pip install yamllint)")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 100}\n"
        "  document-start: disable\n"
        "  comments: {min-spaces-from-content: 1}\n"
        "  truthy: {check-keys: false}\n")
    report = []
    for path in _yaml_files():
        report += [f"{_rel(path)}:{p.line}: {p.message}"
                   for p in linter.run(path.read_text(), config, str(path))]
    assert not report, "\n".join(report)


# ============================================================================================
# Tests: the TLS settings on a real (local) Dask cluster
# ============================================================================================

def _write_certificates(directory: Path) -> None:
    """A throw-away CA and one certificate it signs: ca.crt, tls.crt, tls.key (the Secret's
    keys)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def subject(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(hours=1)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder(subject_name=subject("diffim-dask-ca"),
                                  issuer_name=subject("diffim-dask-ca"),
                                  public_key=ca_key.public_key(), serial_number=1, **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder(subject_name=subject("diffim-dask"), issuer_name=ca.subject,
                                    public_key=key.public_key(), serial_number=2, **valid)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _tls_settings(cert_dir: Path) -> dict[str, str]:
    """The ConfigMap of components/tls with its mount path replaced by ``cert_dir``."""
    (config_map,) = _load_all(DEPLOY / "components" / "tls" / "configmap.yaml")
    mounted = "/etc/diffim-dask/tls/"
    settings = dict(config_map["data"])
    assert all(v.startswith(mounted) for k, v in settings.items() if "TLS__" in k)
    return {k: v.replace(mounted, f"{cert_dir}/") for k, v in settings.items()}


def _dotted(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dask config -> dotted keys, so ``dask.config.set`` changes only those keys."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"process exited early: {process.args}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.1)


@pytest.mark.cluster
def test_tls_settings_secure_a_real_dask_cluster(tmp_path):
    """The scheduler and worker commands of the manifests, configured only by the TLS
    component's environment, form a cluster that listens on tls://, accepts a client holding
    the certificates (as the runner does, through DASK_SCHEDULER_ADDRESS), and refuses one
    whose certificate another CA signed."""
    pytest.importorskip("cryptography", reason="cryptography is needed to make test "
                                               "certificates (pip install cryptography)")
    import os

    import dask.config
    from distributed import Client

    _write_certificates(tmp_path / "certs")
    _write_certificates(tmp_path / "intruder")
    settings = _tls_settings(tmp_path / "certs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(settings)
    dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent))
    if dask_cli is None:
        pytest.skip("the `dask` command is not installed next to this Python")

    job = _base_job()
    cluster = job["spec"]["cluster"]["spec"]
    scheduler = cluster["scheduler"]["spec"]["containers"][0]
    worker = cluster["worker"]["spec"]["containers"][0]
    scheduler_file = tmp_path / "scheduler.json"
    processes = []
    try:
        # The manifest's scheduler command on free local ports.
        scheduler_args = list(scheduler["args"])
        scheduler_args[scheduler_args.index("--port") + 1] = "0"
        scheduler_args[scheduler_args.index("--dashboard-address") + 1] = "127.0.0.1:0"
        processes.append(subprocess.Popen(
            [dask_cli, *scheduler["command"][1:], *scheduler_args, "--host", "127.0.0.1",
             "--scheduler-file", str(scheduler_file)],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(scheduler_file, processes[0])
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://"), address

        # The manifest's worker command, with what the kubelet would substitute.
        substitutions = {"$(DASK_WORKER_NAME)": "worker-0", "$(DASK_WORKER_NTHREADS)": "1",
                         "$(DASK_WORKER_MEMORY_LIMIT)": str(2**30)}
        worker_args = [substitutions.get(a, a) for a in worker["args"]]
        worker_args[worker_args.index("--local-directory") + 1] = str(tmp_path / "scratch")
        worker_args[worker_args.index("--dashboard-address") + 1] = "127.0.0.1:0"
        processes.append(subprocess.Popen(
            [dask_cli, *worker["command"][1:], *worker_args],
            env={**env, "DASK_SCHEDULER_ADDRESS": address}, cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        # The runner: configuration from its environment only.
        runner_config = _dotted(dask.config.collect_env(
            {**settings, "DASK_SCHEDULER_ADDRESS": address}))
        with dask.config.set(runner_config):
            with Client(timeout=30) as client:
                client.wait_for_workers(1, timeout=60)
                assert client.submit(sum, [20, 22]).result(timeout=30) == 42
                workers = client.scheduler_info()["workers"]
                assert all(w.startswith("tls://") for w in workers), workers

        intruder = tmp_path / "intruder"
        with dask.config.set({**runner_config, "distributed.comm.tls.ca-file":
                              str(intruder / "ca.crt"),
                              "distributed.comm.tls.client.cert": str(intruder / "tls.crt"),
                              "distributed.comm.tls.client.key": str(intruder / "tls.key")}):
            with pytest.raises(OSError, match="TLS|certificate|SSL"):
                Client(address, timeout=5)
    finally:
        # The worker first, while its scheduler can still acknowledge its departure.
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
