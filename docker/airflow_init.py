"""The airflow-init one-shot of docker/compose.yaml: what the stack needs before its Airflow services start.

Runs on every `docker compose up` (each step is idempotent), from the environment compose gives it,
which comes from docker/.env:

1. refuses secrets still holding the placeholder of docker/.env.example, and a malformed Fernet key,
   naming the docker/.env variable to fix;
2. writes the login's password file for Airflow's simple auth manager ([core]
   simple_auth_manager_passwords_file, JSON {"user": "password"}), on a volume the API server mounts;
3. `airflow db migrate` (Airflow's metadata database);
4. `vtag db upgrade` (our database, VTAG_DB_URL);
5. the connections `yt8m_db` and `yt8m_s3` and the variables `yt8m_*_uri` that airflow_glue/config.py
   reads, overwritten each time (docker/.env is their source of truth), and the pool `gpu` that
   training and nightly inference run in.

The image copies it to /opt/vtag/airflow_init.py; tests/test_docker.py imports it to check what it
defines against the project.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PLACEHOLDER = "change-me"

# Environment variable of the container -> the docker/.env variable it comes from.
SECRETS = {
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
    "AIRFLOW__API__SECRET_KEY": "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
    "AIRFLOW_ADMIN_PASSWORD": "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "AIRFLOW_DB_PASSWORD",
    "VTAG_DB_URL": "VTAG_DB_PASSWORD",
    "AWS_ACCESS_KEY_ID": "MINIO_ROOT_USER",
    "AWS_SECRET_ACCESS_KEY": "MINIO_ROOT_PASSWORD",
}

# airflow_glue/config.py's variable -> the environment variable (tasks/settings.py's) that holds its value.
VARIABLES = {
    "yt8m_raw_uri": "VTAG_RAW_URI",
    "yt8m_parquet_uri": "VTAG_PARQUET_URI",
    "yt8m_models_uri": "VTAG_MODELS_URI",
    "yt8m_exports_uri": "VTAG_EXPORTS_URI",
}

GPU_POOL = "gpu"


class InitError(Exception):
    """A problem the user fixes in docker/.env: one line, no traceback."""


def check_secrets(env: dict[str, str]) -> None:
    for name, dotenv in SECRETS.items():
        if PLACEHOLDER in env.get(name, ""):
            raise InitError(
                f"{dotenv} in docker/.env still holds the placeholder of docker/.env.example: "
                "set a real value (see the comments there)"
            )
    from cryptography.fernet import Fernet

    try:
        Fernet(env["AIRFLOW__CORE__FERNET_KEY"].encode())
    except (KeyError, ValueError):
        raise InitError(
            "AIRFLOW_FERNET_KEY in docker/.env is not a Fernet key: generate one with "
            "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
        ) from None


def login_passwords(env: dict[str, str]) -> dict[str, str]:
    """The simple auth manager's password file: the first user of [core] simple_auth_manager_users gets
    AIRFLOW_ADMIN_PASSWORD (any other user listed there gets a generated one, printed by the API server)."""
    users = [u.split(":")[0].strip() for u in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",") if u.strip()]
    return {users[0]: env["AIRFLOW_ADMIN_PASSWORD"]}


def write_password_file(env: dict[str, str]) -> Path:
    path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    if not os.access(path.parent, os.W_OK):
        raise InitError(
            f"{path.parent} is not writable by uid {os.getuid()}: it is the airflow-auth volume, "
            "created from the image's folder; recreate it (docker compose down, docker volume rm)"
        )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwords-")  # mode 0600
    with os.fdopen(fd, "w") as f:
        json.dump(login_passwords(env), f)
        f.write("\n")
    os.replace(tmp, path)
    return path


def connections(env: dict[str, str]) -> dict[str, dict]:
    """`airflow connections import` JSON: the database of VTAG_DB_URL and the S3 endpoint of AWS_*."""
    from sqlalchemy.engine import make_url

    from airflow_glue.config import DB_CONN_ID, S3_CONN_ID

    url = make_url(env["VTAG_DB_URL"])
    if url.get_backend_name() == "postgresql":
        db = {
            "conn_type": "postgres",
            "host": url.host,
            "port": url.port or 5432,
            "schema": url.database,
            "login": url.username,
            "password": url.password,
        }
    else:  # airflow_glue/config.py takes any other database as a sqlalchemy_url extra
        db = {"conn_type": "generic", "extra": json.dumps({"sqlalchemy_url": env["VTAG_DB_URL"]})}
    s3 = {
        "conn_type": "aws",
        "login": env["AWS_ACCESS_KEY_ID"],
        "password": env["AWS_SECRET_ACCESS_KEY"],
        "extra": json.dumps({"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"]}),
    }
    return {DB_CONN_ID: db, S3_CONN_ID: s3}


def variables(env: dict[str, str]) -> dict[str, str]:
    return {name: env[source] for name, source in VARIABLES.items()}


def gpu_pool_slots(env: dict[str, str]) -> int:
    slots = env.get("GPU_POOL_SLOTS", "1")
    if not slots.isdigit() or int(slots) < 1:
        raise InitError(f"GPU_POOL_SLOTS in docker/.env must be a whole number of at least 1, not {slots!r}")
    return int(slots)


def _run(*command: str) -> str:
    print("+", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise InitError(f"{' '.join(command[:3])} failed with exit status {done.returncode} (output above)")
    return done.stdout


def _import(kind: str, content: dict, *options: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # mode 0600, removed on close
        json.dump(content, f)
        f.flush()
        return _run("airflow", kind, "import", f.name, *options)


def main() -> int:
    env = dict(os.environ)
    try:
        check_secrets(env)
        slots = gpu_pool_slots(env)
        print(f"login password file: {write_password_file(env)}", flush=True)
        _run("airflow", "db", "migrate")
        _run("vtag", "db", "upgrade")  # reads VTAG_DB_URL
        _import("connections", connections(env), "--overwrite")
        wanted = variables(env)
        out = _import("variables", wanted, "--action-on-existing-key", "overwrite")
        if f"{len(wanted)} of {len(wanted)} variables successfully updated" not in out:
            raise InitError("airflow variables import did not update every variable (output above)")
        _run("airflow", "pools", "set", GPU_POOL, str(slots), "GPU tasks: training and nightly inference")
    except InitError as exc:
        print(f"airflow-init: error: {exc}", file=sys.stderr)
        return 1
    print("airflow-init: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
