"""Static checks of the deployment configuration.

Reads the real files (compose.yaml, Procfile, deploy/Dockerfile, deploy/k8s/**,
.env.example) and checks them against the code: commands must parse with the CLI
that pyproject.toml installs, environment variables must be settings that
``app.core.settings`` reads, probes must hit the health endpoints on the ports the
containers open.  Nothing is started; no Docker or cluster is needed.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.core.errors import ConfigError  # noqa: E402
from app.core.settings import Settings, known_env_vars  # noqa: E402

COMPOSE = ROOT / "compose.yaml"
PROCFILE = ROOT / "Procfile"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
K8S_PRODUCTION = K8S / "overlays" / "production"

KNOWN = known_env_vars()
# Variables that are not Sluice settings but may be set next to them.
NON_SLUICE_ENV = frozenset(
    {
        "HF_HUB_OFFLINE",  # huggingface_hub: the model ships in a package, never download
        "PORT",  # platform-assigned port (Procfile `web`)
    }
)
ALLOWED_ENV = KNOWN | NON_SLUICE_ENV
REQUIRED = frozenset(f.name.upper() for f in msgspec.structs.fields(Settings) if f.required)
CLI_PROGRAMS = frozenset({"sluice", "sluice-worker"})

# What each process must run: program and subcommand (the leading argv words).
COMPOSE_COMMANDS = {
    "gateway": ("sluice", "gateway"),
    "worker": ("sluice-worker",),
    "ws": ("sluice", "ws"),
    "embedder": ("sluice", "embedder"),
    "migrate": ("sluice", "migrate"),
}
PROCFILE_COMMANDS = {
    "web": ("sluice", "gateway"),
    "worker": ("sluice-worker",),
    "ws": ("sluice", "ws"),
    "embedder": ("sluice", "embedder"),
    "release": ("sluice", "migrate"),
}
K8S_COMMANDS = {  # (kind, name) -> argv prefix
    ("Deployment", "sluice-gateway"): ("sluice", "gateway"),
    ("Deployment", "sluice-worker"): ("sluice-worker",),
    ("Deployment", "sluice-ws"): ("sluice", "ws"),
    ("Deployment", "sluice-embedder"): ("sluice", "embedder"),
    ("Job", "sluice-migrate"): ("sluice", "migrate"),
}
# Deployment -> (container port, liveness path, readiness path)
K8S_PROBES = {
    "sluice-gateway": (8000, "/health", "/health/ready"),
    "sluice-worker": (9100, "/health", "/health"),
    "sluice-ws": (8765, "/health", "/health"),
    # ready only once the model is loaded: no query reaches a cold embedder
    "sluice-embedder": (8090, "/health", "/health/ready"),
}
HEALTH_PATHS = frozenset({"/health", "/health/ready"})

COMPOSE_APP_SERVICES = ("gateway", "worker", "ws", "embedder", "migrate")
COMPOSE_LONG_RUNNING = ("gateway", "worker", "ws", "embedder")
COMPOSE_PORTS = {"gateway": 8000, "worker": 9100, "ws": 8765, "embedder": 8090}
COMPOSE_IMAGES = {  # service -> image without tag, required tag (or None)
    "minio": ("minio/minio", None),
    "createbucket": ("minio/mc", None),
    "redis": ("redis", "7"),
    "postgres": ("pgvector/pgvector", "pg16"),
}
COMPOSE_HEALTHCHECKED = ("gateway", "worker", "ws", "embedder", "minio", "redis", "postgres")
COMPOSE_VOLUME_SERVICES = ("minio", "redis", "postgres")

# Stands in for `${VAR:?message}` / `${VAR}` when building Settings from compose.
INTERPOLATED = "interpolated-by-compose-0123456789"


# --- helpers ---------------------------------------------------------------------------


def _read(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    return path.read_text(encoding="utf-8")


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(_read(path))
    except yaml.YAMLError as exc:
        pytest.fail(f"{path.relative_to(ROOT)} is not valid YAML: {exc}")


def _compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE)
    assert isinstance(data, dict), "compose.yaml: top level must be a mapping"
    assert isinstance(data.get("services"), dict), "compose.yaml: no `services` mapping"
    return data


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"compose.yaml: service {name!r} is missing"
    service = services[name]
    assert isinstance(service, dict), f"compose.yaml: service {name!r} must be a mapping"
    return service


def _interpolate(value: str) -> str:
    """Resolve compose ``${...}`` interpolation the way `docker compose` would for a
    variable that is unset, except that required ones (``:?``) get a stand-in."""

    def replace(match: re.Match[str]) -> str:
        expr = match.group(1) or match.group(2)
        for separator in (":-", "-"):
            name, found, default = expr.partition(separator)
            if found and re.fullmatch(r"\w+", name):
                return default
        return INTERPOLATED

    value = re.sub(r"\$\{([^}]*)\}|\$(\w+)", replace, value.replace("$$", "\0"))
    return value.replace("\0", "$")


def _compose_env(name: str) -> dict[str, str]:
    env = _service(name).get("environment") or {}
    if isinstance(env, list):
        pairs = [item.split("=", 1) if "=" in item else [item, ""] for item in map(str, env)]
        env = dict(pairs)
    assert isinstance(env, dict), f"compose.yaml: {name}.environment must be a mapping or list"
    return {str(k): "" if v is None else _interpolate(str(v)) for k, v in env.items()}


def _argv(command: Any, where: str) -> list[str]:
    if isinstance(command, str):
        argv = shlex.split(command)
    elif isinstance(command, list):
        argv = [str(part) for part in command]
    else:
        pytest.fail(f"{where}: command must be a string or a list, got {command!r}")
    assert argv, f"{where}: command is empty"
    return argv


def _project_scripts() -> dict[str, str]:
    assert PYPROJECT.is_file(), "pyproject.toml does not exist"
    with PYPROJECT.open("rb") as f:
        project = tomllib.load(f).get("project", {})
    scripts = project.get("scripts", {})
    assert scripts, "pyproject.toml: [project.scripts] is missing or empty"
    return scripts


def _check_cli(argv: list[str], expected: tuple[str, ...], where: str) -> None:
    """``argv`` must start with ``expected``, run a console script that pyproject.toml
    declares, and (for ``sluice``) be accepted by ``app.cli.build_parser()``."""
    program, *args = argv
    assert program in CLI_PROGRAMS, (
        f"{where}: runs {program!r}; Sluice processes must run one of {sorted(CLI_PROGRAMS)}"
    )
    assert tuple(argv[: len(expected)]) == expected, (
        f"{where}: command {shlex.join(argv)!r} should start with {shlex.join(expected)!r}"
    )
    scripts = _project_scripts()
    assert program in scripts, (
        f"{where}: {program!r} is not declared under [project.scripts] in pyproject.toml "
        f"(declared: {sorted(scripts)})"
    )
    if program == "sluice-worker":
        assert not args, f"{where}: sluice-worker takes no arguments, got {args}"
        return
    # Imported here so that only the tests that parse commands need app.cli.
    cli = importlib.import_module("app.cli")
    try:
        cli.build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(
            f"{where}: `sluice {shlex.join(args)}` is rejected by app.cli.build_parser() "
            f"(argparse exit status {exc.code})"
        )


def _settings_error(environ: dict[str, str]) -> str | None:
    try:
        Settings.from_environ(environ)
    except ConfigError as exc:
        return str(exc)
    return None


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


def _k8s_docs(root: Path = K8S) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(p for p in root.rglob("*") if p.suffix in {".yaml", ".yml"}):
        for doc in yaml.safe_load_all(_read(path)):
            if doc is not None:
                yield path, doc


def _k8s_objects(kind: str, root: Path = K8S) -> dict[str, tuple[Path, dict[str, Any]]]:
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, doc in _k8s_docs(root):
        if doc.get("kind") == kind:
            name = doc.get("metadata", {}).get("name")
            where = path.relative_to(ROOT)
            assert name, f"{where}: a {kind} has no metadata.name"
            assert name not in found, f"{where}: {kind} {name!r} is defined twice"
            found[name] = (path, doc)
    return found


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def _container_ports(container: dict[str, Any]) -> dict[str | int, int]:
    """Port names and numbers -> container port number."""
    ports: dict[str | int, int] = {}
    for port in container.get("ports") or []:
        number = int(port["containerPort"])
        ports[number] = number
        if "name" in port:
            ports[port["name"]] = number
    return ports


def _k8s_settings_sources() -> tuple[dict[str, str], dict[str, str]]:
    configmaps = _k8s_objects("ConfigMap", K8S_BASE)
    secrets = _k8s_objects("Secret", K8S_BASE)
    assert "sluice-config" in configmaps, "deploy/k8s/base: ConfigMap sluice-config is missing"
    assert "sluice-secrets" in secrets, (
        "deploy/k8s/base: Secret sluice-secrets (the example) is missing"
    )
    config = configmaps["sluice-config"][1].get("data") or {}
    secret_doc = secrets["sluice-secrets"][1]
    secret = dict(secret_doc.get("stringData") or {})
    secret.update(secret_doc.get("data") or {})
    return (
        {str(k): str(v) for k, v in config.items()},
        {str(k): str(v) for k, v in secret.items()},
    )


# --- (a) compose.yaml: services, images, healthchecks --------------------------------


def test_compose_has_required_services() -> None:
    services = _compose()["services"]
    expected = {*COMPOSE_APP_SERVICES, "minio", "createbucket", "redis", "postgres"}
    missing = expected - set(services)
    assert not missing, f"compose.yaml: missing services {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(COMPOSE_IMAGES))
def test_compose_infrastructure_images(name: str) -> None:
    repository, tag = COMPOSE_IMAGES[name]
    image = str(_service(name).get("image", ""))
    image_repo, _, image_tag = image.partition(":")
    assert image_repo == repository, (
        f"compose.yaml: service {name!r} uses image {image!r}, expected {repository}"
    )
    if tag is not None:
        assert image_tag == tag or image_tag.startswith(f"{tag}."), (
            f"compose.yaml: service {name!r} uses image {image!r}, expected {repository}:{tag}"
        )


@pytest.mark.parametrize("name", COMPOSE_HEALTHCHECKED)
def test_compose_healthchecks(name: str) -> None:
    check = _service(name).get("healthcheck")
    assert isinstance(check, dict), f"compose.yaml: service {name!r} has no healthcheck"
    assert not check.get("disable"), f"compose.yaml: {name!r} healthcheck is disabled"
    test = check.get("test")
    assert test and test != ["NONE"], f"compose.yaml: {name!r} healthcheck has no test"
    text = test if isinstance(test, str) else " ".join(map(str, test))
    if name in COMPOSE_PORTS:
        url = f"127.0.0.1:{COMPOSE_PORTS[name]}/health"
        assert url in text or f"localhost:{COMPOSE_PORTS[name]}/health" in text, (
            f"compose.yaml: {name!r} healthcheck should GET /health on port "
            f"{COMPOSE_PORTS[name]}, got {text!r}"
        )
    if name == "postgres":
        assert "pg_isready" in text, "compose.yaml: postgres healthcheck should use pg_isready"


def test_compose_app_services_build_the_dockerfile() -> None:
    services = _compose()["services"]
    built = {name for name, service in services.items() if "build" in service}
    assert built == set(COMPOSE_APP_SERVICES), (
        f"compose.yaml: services built from the repo are {sorted(built)}, "
        f"expected {sorted(COMPOSE_APP_SERVICES)}"
    )
    for name in COMPOSE_APP_SERVICES:
        build = services[name]["build"]
        assert isinstance(build, dict), f"compose.yaml: {name}.build must be a mapping"
        assert build.get("context") in (".", "./"), (
            f"compose.yaml: {name}.build.context is {build.get('context')!r}, expected '.'"
        )
        assert build.get("dockerfile") == "deploy/Dockerfile", (
            f"compose.yaml: {name}.build.dockerfile is {build.get('dockerfile')!r}, "
            "expected 'deploy/Dockerfile'"
        )
        assert (ROOT / build["dockerfile"]).is_file(), "deploy/Dockerfile does not exist"


@pytest.mark.parametrize("name", COMPOSE_LONG_RUNNING)
def test_compose_app_services_wait_for_one_shots(name: str) -> None:
    depends_on = _service(name).get("depends_on")
    assert isinstance(depends_on, dict), (
        f"compose.yaml: {name}.depends_on must be a mapping with conditions"
    )
    for one_shot in ("migrate", "createbucket"):
        condition = (depends_on.get(one_shot) or {}).get("condition")
        assert condition == "service_completed_successfully", (
            f"compose.yaml: {name} must depend on {one_shot} with condition "
            f"service_completed_successfully, got {condition!r}"
        )
    for infra in ("postgres", "redis", "minio"):
        condition = (depends_on.get(infra) or {}).get("condition")
        assert condition == "service_healthy", (
            f"compose.yaml: {name} must depend on {infra} being service_healthy, got {condition!r}"
        )


def test_compose_named_volumes_and_redis_persistence() -> None:
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    for name in COMPOSE_VOLUME_SERVICES:
        mounts = _service(name).get("volumes") or []
        sources = {str(m).split(":", 1)[0] if isinstance(m, str) else m["source"] for m in mounts}
        named = sources & declared
        assert named, (
            f"compose.yaml: {name} mounts no named volume (mounts {sorted(sources)}, "
            f"declared volumes {sorted(declared)})"
        )
    redis_command = " ".join(_argv(_service("redis").get("command", ""), "compose.yaml: redis"))
    assert "--appendonly yes" in redis_command, (
        f"compose.yaml: redis should run with --appendonly yes, runs {redis_command!r}"
    )


def test_compose_infrastructure_matches_app_settings() -> None:
    """Hosts and credentials in the shared app environment point at the compose
    services and match what those services are configured with."""
    env = _compose_env("gateway")
    services = _compose()["services"]

    database = urlsplit(env["DATABASE_URL"])
    assert database.hostname in services, (
        f"compose.yaml: DATABASE_URL host {database.hostname!r} is not a compose service"
    )
    postgres = _compose_env("postgres")
    assert (database.username, database.password, database.path.lstrip("/")) == (
        postgres.get("POSTGRES_USER"),
        postgres.get("POSTGRES_PASSWORD"),
        postgres.get("POSTGRES_DB"),
    ), "compose.yaml: DATABASE_URL user/password/database differ from the postgres service"

    redis_host = urlsplit(env["REDIS_URL"]).hostname
    assert redis_host in services, f"compose.yaml: REDIS_URL host {redis_host!r} is not a service"
    minio_host = urlsplit("//" + env["MINIO_ENDPOINT"].split("://")[-1]).hostname
    assert minio_host in services, (
        f"compose.yaml: MINIO_ENDPOINT host {minio_host!r} is not a compose service"
    )

    minio = _compose_env("minio")
    assert (env["MINIO_ACCESS_KEY"], env["MINIO_SECRET_KEY"]) == (
        minio.get("MINIO_ROOT_USER"),
        minio.get("MINIO_ROOT_PASSWORD"),
    ), "compose.yaml: MINIO_ACCESS_KEY/MINIO_SECRET_KEY differ from the minio root credentials"

    createbucket = _service("createbucket")
    bucket_env = _compose_env("createbucket")
    script = " ".join(_argv(createbucket.get("command", ""), "compose.yaml: createbucket"))
    assert "MINIO_BUCKET_NAME" in script, (
        "compose.yaml: createbucket's command does not use MINIO_BUCKET_NAME"
    )
    assert bucket_env.get("MINIO_BUCKET_NAME") == env.get("MINIO_BUCKET_NAME", "sluice"), (
        "compose.yaml: createbucket creates a different bucket than MINIO_BUCKET_NAME of the app"
    )


# --- (b) compose commands run declared console scripts and parse ----------------------


@pytest.mark.parametrize("name", COMPOSE_APP_SERVICES)
def test_compose_commands_parse(name: str) -> None:
    service = _service(name)
    where = f"compose.yaml: service {name!r}"
    assert not service.get("entrypoint"), f"{where}: must not override the image entrypoint"
    assert "command" in service, f"{where}: has no command"
    _check_cli(_argv(service["command"], where), COMPOSE_COMMANDS[name], where)


# --- (c) environment variables are settings; required ones are set -------------------


@pytest.mark.parametrize("name", COMPOSE_APP_SERVICES)
def test_compose_environment(name: str) -> None:
    env = _compose_env(name)
    unknown = set(env) - ALLOWED_ENV
    assert not unknown, (
        f"compose.yaml: service {name!r} sets {sorted(unknown)}, which no Sluice setting "
        f"reads (app.core.settings.known_env_vars()) and which are not allowlisted"
    )
    missing = {var for var in REQUIRED if not env.get(var)}
    assert not missing, f"compose.yaml: service {name!r} lacks required settings {sorted(missing)}"
    error = _settings_error(env)
    assert error is None, f"compose.yaml: service {name!r} environment is invalid: {error}"


def test_compose_app_services_share_one_environment() -> None:
    reference = _compose_env("gateway")
    for name in COMPOSE_APP_SERVICES:
        assert _compose_env(name) == reference, (
            f"compose.yaml: service {name!r} environment differs from gateway's; "
            "share one block (x-sluice-env)"
        )


def test_k8s_configmap_and_secret_variables() -> None:
    config, secret = _k8s_settings_sources()
    for source, names in (
        ("ConfigMap sluice-config", config),
        ("Secret sluice-secrets", secret),
    ):
        unknown = set(names) - ALLOWED_ENV
        assert not unknown, (
            f"deploy/k8s/base: {source} sets {sorted(unknown)}, which no Sluice setting reads"
        )
    both = set(config) & set(secret)
    assert not both, f"deploy/k8s/base: {sorted(both)} set in both the ConfigMap and the Secret"
    missing = REQUIRED - set(config) - set(secret)
    assert not missing, (
        f"deploy/k8s/base: required settings {sorted(missing)} are in neither the "
        "ConfigMap nor the Secret"
    )
    error = _settings_error({**config, **secret})
    assert error is None, f"deploy/k8s/base: ConfigMap + Secret do not make valid settings: {error}"


def test_k8s_secret_is_a_marked_example() -> None:
    _, secret = _k8s_settings_sources()
    unmarked = sorted(k for k, v in secret.items() if "change-me" not in v.lower())
    assert not unmarked, (
        f"deploy/k8s/base/secret.example.yaml: {unmarked} do not hold a CHANGE-ME placeholder"
    )
    for path, doc in _k8s_docs():
        if doc.get("kind") == "Kustomization":
            resources = [str(r) for r in doc.get("resources") or []]
            listed = [r for r in resources if "secret.example" in r]
            assert not listed, (
                f"{path.relative_to(ROOT)}: lists {listed}; the placeholder Secret must not "
                "be deployed (it would overwrite real credentials)"
            )


def test_k8s_containers_read_config_and_known_env() -> None:
    configmaps = set(_k8s_objects("ConfigMap", K8S_BASE))
    secrets = set(_k8s_objects("Secret", K8S_BASE))
    for (kind, name), _ in K8S_COMMANDS.items():
        objects = _k8s_objects(kind, K8S_BASE)
        assert name in objects, f"deploy/k8s/base: {kind} {name!r} is missing"
        path, doc = objects[name]
        for container in _pod_spec(doc).get("containers", []):
            where = f"{path.relative_to(ROOT)}: {kind} {name}, container {container['name']}"
            refs = container.get("envFrom") or []
            used_maps = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
            used_secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
            assert used_maps and used_maps <= configmaps, (
                f"{where}: envFrom ConfigMaps {sorted(used_maps)} are not all defined "
                f"({sorted(configmaps)})"
            )
            assert used_secrets and used_secrets <= secrets, (
                f"{where}: envFrom Secrets {sorted(used_secrets)} are not all defined "
                f"({sorted(secrets)})"
            )
            unknown = {e["name"] for e in container.get("env") or []} - ALLOWED_ENV
            assert not unknown, f"{where}: sets {sorted(unknown)}, which no Sluice setting reads"


# --- (d) .env.example lists exactly the settings --------------------------------------


def _env_example() -> list[tuple[str, str, list[str]]]:
    """(name, value, comment lines right above it) for every assignment."""
    entries: list[tuple[str, str, list[str]]] = []
    comments: list[str] = []
    for number, line in enumerate(_read(ENV_EXAMPLE).splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            comments = []
        elif stripped.startswith("#"):
            comments.append(stripped)
        else:
            match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", stripped)
            assert match, f".env.example line {number}: {line!r} is not NAME=value"
            entries.append((match.group(1), match.group(2), comments))
            comments = []
    return entries


def test_env_example_names_are_exactly_the_settings() -> None:
    entries = _env_example()
    names = [name for name, _, _ in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f".env.example: {duplicates} appear more than once"
    assert not set(names) - KNOWN, (
        f".env.example: {sorted(set(names) - KNOWN)} are not Sluice settings"
    )
    assert not KNOWN - set(names), f".env.example: missing {sorted(KNOWN - set(names))}"


def test_env_example_is_documented_and_valid() -> None:
    entries = _env_example()
    for name, _, comments in entries:
        assert comments, f".env.example: {name} has no # comment right above it"
        text = " ".join(comments).lower()
        word = "required" if name in REQUIRED else "default"
        assert word in text, f".env.example: the comment above {name} should say its {word}"
    error = _settings_error({name: value for name, value, _ in entries})
    assert error is None, f".env.example: its values do not make valid settings: {error}"


# --- (e) Procfile -----------------------------------------------------------------------


def _procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for number, line in enumerate(_read(PROCFILE).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip())
        assert match, f"Procfile line {number}: {line!r} is not `name: command`"
        assert match.group(1) not in processes, f"Procfile: {match.group(1)!r} is defined twice"
        processes[match.group(1)] = match.group(2)
    return processes


def test_procfile_has_processes() -> None:
    missing = set(PROCFILE_COMMANDS) - set(_procfile())
    assert not missing, f"Procfile: missing processes {sorted(missing)}"


@pytest.mark.parametrize("process", sorted(PROCFILE_COMMANDS))
def test_procfile_commands_parse(process: str) -> None:
    command = _procfile().get(process)
    assert command, f"Procfile: no {process!r} process"
    where = f"Procfile: {process}"
    if process == "web":
        assert "$PORT" in command or "${PORT}" in command, f"{where}: must listen on $PORT"
    argv = [re.sub(r"\$\{?PORT\}?", "8000", word) for word in shlex.split(command)]
    _check_cli(argv, PROCFILE_COMMANDS[process], where)


# --- Dockerfile -------------------------------------------------------------------------


def _dockerfile_instructions() -> list[str]:
    """Instructions with comments dropped and ``\\`` continuations joined."""
    instructions: list[str] = []
    pending = ""
    for line in _read(DOCKERFILE).splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        instructions.append(" ".join((pending + stripped).split()))
        pending = ""
    return instructions


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    assert any(re.fullmatch(r"FROM python:3\.11-slim\b.*", i) for i in instructions), (
        "deploy/Dockerfile: must be based on python:3.11-slim"
    )
    runs = [i for i in instructions if i.startswith("RUN ")]
    torch = [n for n, i in enumerate(runs) if "download.pytorch.org/whl/cpu" in i]
    project = [n for n, i in enumerate(runs) if re.search(r"pip install \.(\s|$)", i)]
    assert torch, "deploy/Dockerfile: no RUN installs the CPU build of torch"
    assert project, "deploy/Dockerfile: no RUN does `pip install .`"
    assert torch[0] < project[0], (
        "deploy/Dockerfile: CPU torch must be installed before `pip install .`"
    )
    envs = " ".join(i for i in instructions if i.startswith("ENV "))
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", envs), (
        "deploy/Dockerfile: must set ENV HF_HUB_OFFLINE=1"
    )
    users = [i.split(None, 1)[1] for i in instructions if i.startswith("USER ")]
    assert users, "deploy/Dockerfile: no USER instruction (the image must not run as root)"
    assert users[-1].split(":")[0] not in {"root", "0"}, (
        f"deploy/Dockerfile: final USER is {users[-1]!r}; run as a non-root user"
    )
    for instruction in instructions:
        if instruction.startswith("COPY ") and "--from" not in instruction:
            *sources, _ = instruction.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), (
                    f"deploy/Dockerfile: COPY source {source!r} does not exist in the repository"
                )
    copied = {i.split()[-2] for i in instructions if i.startswith("COPY ")}
    assert copied & {"migrations", "migrations/"}, (
        "deploy/Dockerfile: does not COPY migrations/ (needed by `sluice migrate`)"
    )
    cmds = [i for i in instructions if i.startswith("CMD ")]
    assert cmds, "deploy/Dockerfile: no CMD"
    try:
        argv = json.loads(cmds[-1][4:])
    except json.JSONDecodeError:
        pytest.fail("deploy/Dockerfile: CMD must use the exec (JSON array) form")
    _check_cli(argv, ("sluice", "gateway"), "deploy/Dockerfile: CMD")


# --- (f) Kubernetes ---------------------------------------------------------------------


def test_k8s_tree_exists() -> None:
    for directory in (K8S_BASE, K8S_PRODUCTION):
        assert (directory / "kustomization.yaml").is_file(), (
            f"{directory.relative_to(ROOT)}/kustomization.yaml does not exist"
        )


@pytest.mark.parametrize("path", _k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_yaml_parses(path: Path) -> None:
    where = path.relative_to(ROOT)
    try:
        docs = [d for d in yaml.safe_load_all(_read(path)) if d is not None]
    except yaml.YAMLError as exc:
        pytest.fail(f"{where} is not valid YAML: {exc}")
    assert docs, f"{where} holds no documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{where}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{where}: apiVersion/kind missing"
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), f"{where}: {doc['kind']} has no name"


def test_k8s_kustomizations_reference_existing_files() -> None:
    for path, doc in _k8s_docs():
        if doc.get("kind") != "Kustomization":
            continue
        for resource in doc.get("resources") or []:
            assert (path.parent / resource).exists(), (
                f"{path.relative_to(ROOT)}: resource {resource!r} does not exist"
            )


def test_k8s_production_overlay_targets_base() -> None:
    overlay = _load_yaml(K8S_PRODUCTION / "kustomization.yaml")
    where = "deploy/k8s/overlays/production/kustomization.yaml"
    base_objects = {
        (doc.get("kind"), doc.get("metadata", {}).get("name")) for _, doc in _k8s_docs(K8S_BASE)
    }
    patches = overlay.get("patches") or []
    assert patches, f"{where}: no patches"
    for patch in patches:
        target = patch.get("target") or {}
        if "name" in target:
            assert (target.get("kind"), target["name"]) in base_objects, (
                f"{where}: patch target {target} matches nothing in deploy/k8s/base"
            )
    images = {image["name"] for image in overlay.get("images") or []}
    assert images, f"{where}: sets no images"
    for (kind, name), _ in K8S_COMMANDS.items():
        _, doc = _k8s_objects(kind, K8S_BASE)[name]
        for container in _pod_spec(doc).get("containers", []):
            repository = container["image"].rsplit(":", 1)[0]
            assert repository in images, (
                f"{where}: images does not cover {kind} {name}'s image {container['image']!r}"
            )


@pytest.mark.parametrize("kind_name", sorted(K8S_COMMANDS), ids=lambda k: f"{k[0]}-{k[1]}")
def test_k8s_commands_parse(kind_name: tuple[str, str]) -> None:
    kind, name = kind_name
    objects = _k8s_objects(kind, K8S_BASE)
    assert name in objects, f"deploy/k8s/base: {kind} {name!r} is missing"
    path, doc = objects[name]
    containers = _pod_spec(doc).get("containers") or []
    assert len(containers) == 1, f"{path.relative_to(ROOT)}: {name} should have one container"
    container = containers[0]
    where = f"{path.relative_to(ROOT)}: {kind} {name}"
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv, f"{where}: set command explicitly"
    _check_cli(argv, K8S_COMMANDS[kind_name], where)


@pytest.mark.parametrize("name", sorted(K8S_PROBES))
def test_k8s_deployment_probes_and_resources(name: str) -> None:
    deployments = _k8s_objects("Deployment", K8S_BASE)
    assert name in deployments, f"deploy/k8s/base: Deployment {name!r} is missing"
    path, doc = deployments[name]
    port, liveness_path, readiness_path = K8S_PROBES[name]
    for container in _pod_spec(doc).get("containers", []):
        where = f"{path.relative_to(ROOT)}: Deployment {name}, container {container['name']}"
        ports = _container_ports(container)
        assert port in ports, f"{where}: does not open container port {port}"
        for probe_name, expected_path in (
            ("livenessProbe", liveness_path),
            ("readinessProbe", readiness_path),
            ("startupProbe", None),
        ):
            probe = container.get(probe_name)
            if probe is None and expected_path is None:
                continue
            assert probe, f"{where}: no {probe_name}"
            http = probe.get("httpGet")
            assert http, f"{where}: {probe_name} must be an httpGet probe"
            assert http.get("path") in HEALTH_PATHS, (
                f"{where}: {probe_name} path {http.get('path')!r} is not /health or /health/ready"
            )
            if expected_path is not None:
                assert http["path"] == expected_path, (
                    f"{where}: {probe_name} path is {http['path']!r}, expected {expected_path!r}"
                )
            assert http.get("port") in ports, (
                f"{where}: {probe_name} port {http.get('port')!r} is not a container port "
                f"({sorted(map(str, ports))})"
            )
            assert ports[http["port"]] == port, (
                f"{where}: {probe_name} probes port {ports[http['port']]}, expected {port}"
            )
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in (resources.get(section) or {}), (
                    f"{where}: resources.{section}.{resource} is not set"
                )


def test_k8s_services_target_container_ports() -> None:
    deployments = _k8s_objects("Deployment", K8S_BASE)
    services = _k8s_objects("Service", K8S_BASE)
    exposed: set[int] = set()
    for name, (path, service) in services.items():
        where = f"{path.relative_to(ROOT)}: Service {name}"
        selector = service.get("spec", {}).get("selector") or {}
        matches = [
            doc
            for _, doc in deployments.values()
            if selector
            and selector.items()
            <= (doc["spec"]["template"].get("metadata", {}).get("labels") or {}).items()
        ]
        assert len(matches) == 1, f"{where}: selector {selector} matches {len(matches)} Deployments"
        ports: dict[str | int, int] = {}
        for container in _pod_spec(matches[0]).get("containers", []):
            ports.update(_container_ports(container))
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"{where}: targetPort {target!r} is not a container port"
            exposed.add(int(port["port"]))
    assert {8000, 8765, 9100} <= exposed, (
        f"deploy/k8s/base: Services expose {sorted(exposed)}; need 8000, 8765 and 9100"
    )


def test_k8s_keda_scales_the_worker_deployment() -> None:
    scaled = _k8s_objects("ScaledObject", K8S_BASE)
    assert len(scaled) == 1, f"deploy/k8s/base: expected one KEDA ScaledObject, found {len(scaled)}"
    (name, (path, doc)), *_ = scaled.items()
    where = f"{path.relative_to(ROOT)}: ScaledObject {name}"
    assert doc["apiVersion"].startswith("keda.sh/"), f"{where}: apiVersion is not keda.sh"
    spec = doc.get("spec", {})
    target = spec.get("scaleTargetRef") or {}
    assert target.get("kind", "Deployment") == "Deployment", f"{where}: must target a Deployment"
    workers = [
        n
        for n, (_, d) in _k8s_objects("Deployment", K8S_BASE).items()
        if any(c.get("command", [None])[0] == "sluice-worker" for c in _pod_spec(d)["containers"])
    ]
    assert target.get("name") in workers, (
        f"{where}: targets {target.get('name')!r}, but the worker Deployment is {workers}"
    )
    assert (spec.get("minReplicaCount"), spec.get("maxReplicaCount")) == (1, 20), (
        f"{where}: replicas should range 1..20, got "
        f"{spec.get('minReplicaCount')}..{spec.get('maxReplicaCount')}"
    )
    triggers = spec.get("triggers") or []
    prometheus = [t for t in triggers if t.get("type") == "prometheus"]
    assert prometheus, f"{where}: no prometheus trigger (the queue is a sorted set; LLEN sees 0)"
    assert not [t for t in triggers if t.get("type") == "redis"], (
        f"{where}: the redis list scaler cannot read ARQ's sorted-set queue"
    )
    metadata = prometheus[0].get("metadata") or {}
    query = str(metadata.get("query", ""))
    assert query.replace(" ", "").startswith("sum(") and "sluice_queue_depth" in query, (
        f"{where}: query {query!r} should sum sluice_queue_depth"
    )
    float(metadata.get("threshold", "nan"))  # must be a number
    assert metadata.get("serverAddress", "").startswith("http"), f"{where}: no serverAddress"
    worker_doc = _k8s_objects("Deployment", K8S_BASE)[target["name"]][1]
    assert "replicas" not in worker_doc["spec"], (
        f"{where}: the worker Deployment sets replicas, which fights the autoscaler"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", [K8S_BASE, K8S_PRODUCTION], ids=["base", "production"])
def test_k8s_kustomize_renders(directory: Path) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    where = directory.relative_to(ROOT)
    assert result.returncode == 0, f"{where}: kubectl kustomize failed: {result.stderr.strip()}"
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Job", "ConfigMap", "ScaledObject"} <= kinds, (
        f"{where}: rendered kinds are {sorted(kinds)}"
    )
    if directory == K8S_PRODUCTION:
        for doc in docs:
            for container in _pod_spec(doc).get("containers", []):
                assert not container["image"].startswith("sluice"), (
                    f"{where}: {doc['kind']} {doc['metadata']['name']} still uses the "
                    f"unpinned local image {container['image']!r}"
                )


# --- worker metrics bind address ---------------------------------------------------------


def test_worker_metrics_listen_on_loopback_unless_scraped_from_outside(tmp_path: Path) -> None:
    minimal = {name: "x" * 32 for name in REQUIRED}
    assert Settings.from_environ(minimal).worker_metrics_host == "127.0.0.1"
    # Where Prometheus and the kubelet/compose probes reach the worker from outside.
    assert Settings.from_environ(_compose_env("worker")).worker_metrics_host == "0.0.0.0"
    config, secret = _k8s_settings_sources()
    assert Settings.from_environ({**config, **secret}).worker_metrics_host == "0.0.0.0"
    envs = " ".join(i for i in _dockerfile_instructions() if i.startswith("ENV "))
    assert re.search(r"\bWORKER_METRICS_HOST=0\.0\.0\.0(\s|$)", envs), (
        "deploy/Dockerfile: the image should set ENV WORKER_METRICS_HOST=0.0.0.0"
    )
    # `sluice dev` keeps it on loopback, whatever the caller's environment says.
    from devstack.dev import dev_environ
    from devstack.stack import EmbeddedStack

    args = importlib.import_module("app.cli").build_parser().parse_args(["dev"])
    env = dev_environ(
        args, {"WORKER_METRICS_HOST": "0.0.0.0"}, EmbeddedStack.in_dir(tmp_path), "s" * 32
    )
    assert Settings.from_environ(env).worker_metrics_host == "127.0.0.1"


# --- the embedding service: the gateway finds it everywhere --------------------------


def test_the_gateway_is_pointed_at_the_embedder_service() -> None:
    """compose and k8s point SEARCH_EMBEDDING_URL at the embedder's service and port;
    both probe its readiness (model loaded) on /health/ready."""
    assert _compose_env("gateway")["SEARCH_EMBEDDING_URL"] == "http://embedder:8090/v1"
    check = " ".join(map(str, _service("embedder")["healthcheck"]["test"]))
    assert "127.0.0.1:8090/health/ready" in check
    config, _ = _k8s_settings_sources()
    services = _k8s_objects("Service", K8S_BASE)
    assert "sluice-embedder" in services
    port = services["sluice-embedder"][1]["spec"]["ports"][0]["port"]
    assert config["SEARCH_EMBEDDING_URL"] == f"http://sluice-embedder:{port}/v1"
    assert config["EMBEDDER_PORT"] == str(port)
