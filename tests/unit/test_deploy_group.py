"""The deployment files of a coordinator group (deploy/kubernetes, deploy/compose): each one valid
against its schema, and what matters checked across files: the configurations load with the
daemons' own loaders, the probes are ``twopc health`` calls the command accepts, every member id is
a coordinator id that every agent lists, the disruption budget and the Services select the
members, every Secret, ConfigMap and volume referenced exists."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from coordinator.config import CoordinatorConfig, load_coordinator_config
from participants.config import AgentConfig, load_agent_config
from twopc.cli import _parser
from twopc.txid import check_coordinator_id

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
# The Kubernetes release the manifests are checked against (its schemas ship with
# kubernetes-validate; strict: a key the API does not know is an error, not ignored).
KUBERNETES_VERSION = "1.33.0"
STORE_URL = "mysql+pymysql://twopc@store:3306/twopc"
STORE_PASSWORD_ENV = "TWOPC_STORE_PASSWORD"
REGIONS = ("eu", "us")

Doc = dict[str, Any]


def _documents(path: Path) -> list[Doc]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


MANIFEST_FILES = sorted(
    p for p in KUBERNETES.glob("*.yaml") if p.name not in ("kustomization.yaml",)
)
APPLIED_FILES = [p for p in MANIFEST_FILES if p.name != "secrets.example.yaml"]
APPLIED = [doc for path in APPLIED_FILES for doc in _documents(path)]
SECRETS = {doc["metadata"]["name"]: doc for doc in _documents(KUBERNETES / "secrets.example.yaml")}


def _one(kind: str, name: str | None = None) -> Doc:
    found = [d for d in APPLIED if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _all(kind: str) -> list[Doc]:
    return [d for d in APPLIED if d["kind"] == kind]


def _workloads() -> Iterator[Doc]:
    yield from (d for d in APPLIED if d["kind"] in ("StatefulSet", "Deployment"))


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [doc for path in MANIFEST_FILES for doc in _documents(path)],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_a_manifest_validates_against_the_kubernetes_schema(document: Doc) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {where}: {err.message}")


def test_kustomization_applies_every_manifest_but_the_secrets_template() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in APPLIED_FILES)
    namespace = kustomization["namespace"]
    assert _one("Namespace")["metadata"]["name"] == namespace
    for doc in APPLIED + list(SECRETS.values()):  # kubectl apply -f gives the same result
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    images = {c["image"].split(":")[0] for w in _workloads() for c in _containers(w)}
    assert images == {image["name"] for image in kustomization["images"]}


def test_the_readme_describes_every_file() -> None:
    readme = (KUBERNETES / "README.md").read_text()
    for path in KUBERNETES.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


# --- the members ---------------------------------------------------------------------------------


def _containers(workload: Doc) -> list[Doc]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _statefulset() -> Doc:
    return _one("StatefulSet")


def _member_ids() -> list[str]:
    statefulset = _statefulset()
    name = statefulset["metadata"]["name"]
    return [f"{name}-{ordinal}" for ordinal in range(statefulset["spec"]["replicas"])]


def _environment(container: Doc, pod_name: str) -> dict[str, str]:
    """The container's environment as kubelet resolves it for the pod ``pod_name``: values,
    the downward API's metadata.name, and a stand-in for each Secret's value."""
    environ = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", variable
            environ[variable["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            environ[variable["name"]] = f"secret {ref['name']}/{ref['key']}"
    return environ


def _mounted_config(workload: Doc, tmp_path: Path) -> Path:
    """The container's --config file, written from the ConfigMap that its volume mounts."""
    (container,) = _containers(workload)
    command = container["command"]
    config_path = Path(command[command.index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = _volume(workload, mount["name"])
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    target = tmp_path / workload["metadata"]["name"] / config_path.name
    target.parent.mkdir(parents=True)
    target.write_text(config_map["data"][config_path.name])
    return target


def _volume(workload: Doc, name: str) -> Doc:
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == name]
    return dict(volume)


def _member_config(tmp_path: Path, member: str) -> CoordinatorConfig:
    statefulset = _statefulset()
    path = _mounted_config(statefulset, tmp_path / member)
    (container,) = _containers(statefulset)
    return load_coordinator_config(path, environ=_environment(container, member))


def test_every_member_loads_its_configuration_with_its_own_id(tmp_path: Path) -> None:
    """The ConfigMap's TOML with the coordinator's loader, and the environment kubelet gives
    each member: its id and member name are its pod's name, the store password is set."""
    ids = _member_ids()
    assert len(ids) == 3
    for member in ids:
        config = _member_config(tmp_path, member)
        assert (config.coordinator_id, config.member) == (member, member)
        assert config.decision_log == STORE_URL
        assert config.decision_log_password_env == STORE_PASSWORD_ENV
        assert config.lease_ms == 3000
        assert not config.insecure_plaintext
        assert config.decision_log_url() is not None
        assert dict(config.participants) == {r: f"agent-{r}:7201" for r in REGIONS}


def test_every_member_id_is_a_coordinator_id() -> None:
    for member in _member_ids():
        assert check_coordinator_id(member) == member
    # Room for growth: the StatefulSet's name leaves the ids valid up to 99 members.
    check_coordinator_id(f"{_statefulset()['metadata']['name']}-99")


def test_the_store_service_is_what_the_members_dial() -> None:
    store = _one("Service", "store")
    assert [p["port"] for p in store["spec"]["ports"]] == [3306]
    assert STORE_URL.split("@", 1)[1].startswith("store:3306/")


def test_the_services_select_the_members(tmp_path: Path) -> None:
    statefulset = _statefulset()
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    headless = _one("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    client = _one("Service", "coordinator")
    port = int(_member_config(tmp_path, _member_ids()[0]).listen.rpartition(":")[2])
    (container,) = _containers(statefulset)
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named_ports["grpc"] == port
    for service in (headless, client):
        assert service["spec"]["selector"].items() <= labels.items()
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert named_ports[grpc["targetPort"]] == port


def test_the_disruption_budget_keeps_two_members() -> None:
    statefulset = _statefulset()
    budget = _one("PodDisruptionBudget")
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    selector = budget["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert selector == statefulset["spec"]["selector"]["matchLabels"]
    spec = budget["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 2
    # It selects no agent: those are single pods and have no budget of their own.
    for deployment in _all("Deployment"):
        agent_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= agent_labels.items()


def test_a_member_has_time_to_hand_over_cleanly(tmp_path: Path) -> None:
    """SIGTERM: 5 s of grace for calls, phase-2 calls up to rpc_timeout_s, then the lease's
    release; the grace period covers them with room."""
    config = _member_config(tmp_path, _member_ids()[0])
    grace = _statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 5 + config.rpc_timeout_s + 5


# --- the agents ----------------------------------------------------------------------------------


def _agent(region: str) -> Doc:
    return _one("Deployment", f"agent-{region}")


def _agent_config(tmp_path: Path, region: str) -> AgentConfig:
    deployment = _agent(region)
    path = _mounted_config(deployment, tmp_path)
    (container,) = _containers(deployment)
    return load_agent_config(path, environ=_environment(container, f"agent-{region}-x"))


def test_there_is_an_agent_per_region_and_no_other_workload() -> None:
    assert sorted(d["metadata"]["name"] for d in _all("Deployment")) == [
        f"agent-{r}" for r in REGIONS
    ]
    assert len(_all("StatefulSet")) == 1


@pytest.mark.parametrize("region", REGIONS)
def test_an_agent_loads_its_configuration_and_lists_every_member(
    tmp_path: Path, region: str
) -> None:
    config = _agent_config(tmp_path, region)
    assert config.name == region
    assert sorted(config.coordinator_ids) == sorted(_member_ids())
    assert not config.insecure_plaintext
    assert config.coordinator_identities == ("coordinator",)
    (container,) = _containers(_agent(region))
    environ = _environment(container, "x")
    assert config.mysql_password_env in environ
    if config.report_lock_waits and config.lock_waits_user:
        assert config.lock_waits_password_env in environ


@pytest.mark.parametrize("region", REGIONS)
def test_an_agent_is_one_pod_replaced_never_doubled(region: str) -> None:
    spec = _agent(region)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("region", REGIONS)
def test_the_members_dial_each_agent_through_its_service(tmp_path: Path, region: str) -> None:
    member = _member_config(tmp_path / "member", _member_ids()[0])
    host, _, port = member.participants[region].rpartition(":")
    service = _one("Service", host)
    deployment = _agent(region)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = _containers(deployment)
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == int(port)
    listen_port = int(_agent_config(tmp_path / "agent", region).listen.rpartition(":")[2])
    assert named_ports[service_port["targetPort"]] == listen_port


# --- across every workload -----------------------------------------------------------------------


def _config_of(workload: Doc, tmp_path: Path) -> CoordinatorConfig | AgentConfig:
    if workload["kind"] == "StatefulSet":
        return _member_config(tmp_path, _member_ids()[0])
    return _agent_config(tmp_path, workload["metadata"]["name"].removeprefix("agent-"))


WORKLOADS = list(_workloads())
WORKLOAD_IDS = [w["metadata"]["name"] for w in WORKLOADS]


@pytest.mark.parametrize("workload", WORKLOADS, ids=WORKLOAD_IDS)
def test_the_probes_call_twopc_health_on_the_daemons_port_with_its_tls(
    workload: Doc, tmp_path: Path
) -> None:
    """Each probe is a command ``twopc health`` accepts; readiness asks for SERVING, liveness
    and startup for any answer; each dials the daemon's port and presents its certificate."""
    config = _config_of(workload, tmp_path)
    (container,) = _containers(workload)
    service = (
        "twopc.v1.Coordinator" if workload["kind"] == "StatefulSet" else "twopc.v1.Participant"
    )
    port = config.listen.rpartition(":")[2]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe_name]["exec"]["command"]
        assert command[:2] == ["twopc", "health"], probe_name
        args = _parser("health").parse_args(command[1:])
        assert args.address == f"127.0.0.1:{port}"
        assert args.service == service
        assert not args.insecure_plaintext
        files = (Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
        assert files == (config.tls_cert, config.tls_key, config.tls_ca)
        assert args.alive == (probe_name != "readinessProbe"), probe_name
        assert args.timeout < container[probe_name]["timeoutSeconds"]
        assert args.tls_server_name, "the certificate names the Service, not 127.0.0.1"


@pytest.mark.parametrize("workload", WORKLOADS, ids=WORKLOAD_IDS)
def test_a_workload_runs_locked_down(workload: Doc) -> None:
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged", False) is False
        assert "memory" in container["resources"]["limits"]


@pytest.mark.parametrize("workload", WORKLOADS, ids=WORKLOAD_IDS)
def test_every_secret_and_config_map_referenced_exists(workload: Doc, tmp_path: Path) -> None:
    """Env refs name a Secret of secrets.example.yaml and one of its keys; the TLS volume's
    Secret holds the files the configuration names; every mount has its volume."""
    pod = workload["spec"]["template"]["spec"]
    config = _config_of(workload, tmp_path)
    (container,) = pod["containers"]
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] in SECRETS, ref
            assert ref["key"] in SECRETS[ref["name"]]["stringData"], ref
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) == set(volumes)
    assert config.tls_cert is not None
    tls_dir = config.tls_cert.parent
    tls_volume = volumes[mounts[str(tls_dir)]]
    secret = SECRETS[tls_volume["secret"]["secretName"]]
    for path in (config.tls_cert, config.tls_key, config.tls_ca):
        assert path is not None
        assert path.parent == tls_dir
        assert path.name in secret["stringData"], (secret["metadata"]["name"], path.name)
    for volume in volumes.values():
        if "configMap" in volume:
            _one("ConfigMap", volume["configMap"]["name"])


def test_the_store_password_comes_from_the_store_secret() -> None:
    (container,) = _containers(_statefulset())
    (variable,) = [v for v in container["env"] if v["name"] == STORE_PASSWORD_ENV]
    assert variable["valueFrom"]["secretKeyRef"] == {"name": "twopc-store", "key": "password"}


def test_the_secrets_template_holds_nothing_real() -> None:
    for secret in SECRETS.values():
        assert set(secret["stringData"].values()) == {"REPLACE-ME"}, secret["metadata"]["name"]


# --- deploy/compose ------------------------------------------------------------------------------

COMPOSE_FILE = COMPOSE / "compose.yaml"
COMPOSE_DOC: Doc = yaml.safe_load(COMPOSE_FILE.read_text())  # anchors and merge keys resolved
SERVICES: dict[str, Doc] = COMPOSE_DOC["services"]
COMPOSE_ENV = {
    "TWOPC_STORE_PASSWORD": "store-secret",
    "MARIADB_ROOT_PASSWORD": "root-secret",
    "TWOPC_MYSQL_PASSWORD_EU": "eu-secret",
    "TWOPC_MYSQL_PASSWORD_US": "us-secret",
    "TWOPC_LOCK_WAITS_PASSWORD": "lock-secret",
}
MEMBERS = sorted(name for name in SERVICES if name.startswith("coordinator-"))
AGENTS = sorted(name for name in SERVICES if name.startswith("agent-"))


def _compose_schema() -> Doc:
    """The compose-spec JSON schema, as check-jsonschema vendors it (no network)."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return dict(json.loads(vendor.joinpath("compose-spec.json").read_text()))


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(COMPOSE_DOC), key=str)
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_compose_spec_check_catches_a_misspelt_key() -> None:
    """The schema is strict enough to be worth running: an unknown service key fails."""
    schema = _compose_schema()
    broken = json.loads(json.dumps(COMPOSE_DOC))
    broken["services"]["agent-eu"]["depend_on"] = ["mariadb-eu"]
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert not validator.is_valid(broken)


def test_the_compose_group_has_three_members_a_galera_store_and_two_regions() -> None:
    assert MEMBERS == ["coordinator-1", "coordinator-2", "coordinator-3"]
    assert sorted(n for n in SERVICES if n.startswith("galera-")) == [
        "galera-1",
        "galera-2",
        "galera-3",
    ]
    assert [f"agent-{r}" for r in REGIONS] == AGENTS
    assert sorted(n for n in SERVICES if n.startswith("mariadb-")) == [
        f"mariadb-{r}" for r in REGIONS
    ]


def _interpolated(value: str) -> str:
    """``${NAME:?message}`` and ``${NAME}`` from COMPOSE_ENV, as compose does."""
    if value.startswith("${") and value.endswith("}"):
        name = value[2:-1].split(":?", 1)[0]
        return COMPOSE_ENV[name]
    return value


def _service_environment(name: str) -> dict[str, str]:
    environment = SERVICES[name].get("environment", {})
    assert isinstance(environment, dict), name
    return {key: _interpolated(str(value)) for key, value in environment.items()}


def _compose_config_file(service: str, tmp_path: Path) -> Path:
    """The service's --config file, as its compose config mounts it: the file in the repository."""
    command = SERVICES[service]["command"]
    target = command[command.index("--config") + 1]
    (config,) = [c for c in SERVICES[service]["configs"] if c["target"] == target]
    path = COMPOSE / COMPOSE_DOC["configs"][config["source"]]["file"]
    copy = tmp_path / service / Path(target).name
    copy.parent.mkdir(parents=True)
    copy.write_text(path.read_text())
    return copy


def test_the_compose_members_load_their_configuration(tmp_path: Path) -> None:
    ids = []
    for member in MEMBERS:
        path = _compose_config_file(member, tmp_path)
        config = load_coordinator_config(path, environ=_service_environment(member))
        ids.append(config.coordinator_id)
        assert config.member == member
        assert (config.decision_log, config.decision_log_password_env) == (
            STORE_URL,
            STORE_PASSWORD_ENV,
        )
        for region, address in config.participants.items():
            host, _, port = address.rpartition(":")
            assert SERVICES[host]["hostname"] == host == f"agent-{region}"
            agent = load_agent_config(
                _compose_config_file(host, tmp_path / member), environ=_service_environment(host)
            )
            assert agent.listen.endswith(f":{port}")
    assert ids == ["c1", "c2", "c3"]
    for coordinator_id in ids:
        check_coordinator_id(coordinator_id)
    # The store host of the URL is galera-1 alone (an alias): one writer node.
    aliases = {
        name: service.get("networks", {}).get("default", {}).get("aliases", [])
        for name, service in SERVICES.items()
    }
    assert [name for name, names in aliases.items() if "store" in names] == ["galera-1"]


@pytest.mark.parametrize("agent", AGENTS)
def test_a_compose_agent_loads_its_configuration_and_lists_every_member(
    agent: str, tmp_path: Path
) -> None:
    config = load_agent_config(
        _compose_config_file(agent, tmp_path), environ=_service_environment(agent)
    )
    region = agent.removeprefix("agent-")
    assert config.name == region
    assert config.mysql_host == f"mariadb-{region}"
    members = {_service_environment(m)["TWOPC_COORDINATOR_COORDINATOR_ID"] for m in MEMBERS}
    assert set(config.coordinator_ids) == members
    environ = _service_environment(agent)
    assert config.mysql_password(environ) == COMPOSE_ENV[f"TWOPC_MYSQL_PASSWORD_{region.upper()}"]
    assert config.lock_waits_password_env in environ


@pytest.mark.parametrize("service", MEMBERS + AGENTS)
def test_a_compose_daemon_is_checked_with_twopc_health_and_its_own_certificate(
    service: str, tmp_path: Path
) -> None:
    path = _compose_config_file(service, tmp_path)
    environ = _service_environment(service)
    member = service in MEMBERS
    config: CoordinatorConfig | AgentConfig = (
        load_coordinator_config(path, environ=environ)
        if member
        else load_agent_config(path, environ=environ)
    )
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "twopc", "health"]
    args = _parser("health").parse_args(test[2:])
    assert args.address == f"127.0.0.1:{config.listen.rpartition(':')[2]}"
    assert args.service == ("twopc.v1.Coordinator" if member else "twopc.v1.Participant")
    files = (Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
    assert files == (config.tls_cert, config.tls_key, config.tls_ca)
    # The files are in the tls volume, which the certs service fills: it issues this one.
    assert config.tls_cert is not None
    mounts = {v.split(":")[1]: v.split(":")[0] for v in SERVICES[service]["volumes"]}
    assert mounts[str(config.tls_cert.parent)] == "tls"
    script = SERVICES["certs"]["command"][0]
    assert f"twopc certs issue . {config.tls_cert.stem} " in script
    assert SERVICES[service]["depends_on"]["certs"] == {
        "condition": "service_completed_successfully"
    }


def _named(entries: list[Any], key: str = "source") -> list[str]:
    return [e if isinstance(e, str) else e[key] for e in entries]


def test_everything_a_compose_service_references_exists() -> None:
    """The checks compose would make at ``up``: an image or a build per service, every named
    volume, config and secret declared at the top, their files present, every depends_on a
    service, no host port published twice, no TLS key readable from a database container."""
    declared_volumes = set(COMPOSE_DOC["volumes"])
    used_volumes = set()
    host_ports = []
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            assert (COMPOSE / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, (name, source)
                used_volumes.add(source)
        for config in _named(service.get("configs", [])):
            assert config in COMPOSE_DOC["configs"], (name, config)
        for secret in _named(service.get("secrets", [])):
            assert secret in COMPOSE_DOC["secrets"], (name, secret)
        depends_on = service.get("depends_on", {})
        for dependency in depends_on if isinstance(depends_on, list) else depends_on.keys():
            assert dependency in SERVICES, (name, dependency)
            assert dependency != name
        for port in service.get("ports", []):
            host_ports.append(str(port).rsplit(":", 2)[-2] if port.count(":") else str(port))
        if name.startswith(("mariadb-", "galera-")):
            assert "tls" not in {v.split(":")[0] for v in service.get("volumes", [])}, name
    assert used_volumes == declared_volumes
    assert len(host_ports) == len(set(host_ports)), host_ports
    for config in COMPOSE_DOC["configs"].values():
        assert (COMPOSE / config["file"]).is_file(), config
    for secret in COMPOSE_DOC["secrets"].values():
        assert secret["environment"] in COMPOSE_ENV, secret  # never a file in the repository


@pytest.mark.parametrize("service", [*MEMBERS, *AGENTS, "certs"])
def test_a_compose_twopc_container_runs_locked_down(service: str) -> None:
    settings = SERVICES[service]
    assert settings["user"] == "10001:10001"
    assert settings["read_only"] is True
    assert settings["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in settings["security_opt"]


def test_the_compose_agent_databases_create_the_agents_users_with_their_grants_only() -> None:
    script = (COMPOSE / "initdb" / "agent-users.sh").read_text()
    grants = [line.strip() for line in script.splitlines() if line.strip().startswith("GRANT")]
    assert grants == [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON shop.* TO 'twopc_agent'@'%';",
        "GRANT CREATE ON shop.twopc_branch_marker TO 'twopc_agent'@'%';",
        "GRANT PROCESS ON *.* TO 'twopc_lockwait'@'%';",
    ]
    for region in REGIONS:
        secrets = SERVICES[f"mariadb-{region}"]["secrets"]
        targets = {s if isinstance(s, str) else s.get("target", s["source"]) for s in secrets}
        for needed in ("agent_mysql_password", "lock_waits_password"):
            assert f"/run/secrets/{needed}" in script
            assert needed in targets, region
