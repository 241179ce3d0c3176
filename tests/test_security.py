"""Security: no secret in the repository, the analysts' role reads and nothing more, SQL only with bound
parameters, trigger-form inputs validated by Airflow."""

import ast
import copy
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from storage.database.db import engine_for
from tasks import cli, queries
from tasks.inference import run_inference
from tests.support.env import REPO
from tests.support.worlds import NIGHT, build_world, count, rows

# --- no secret in the repository ----------------------------------------------------------------------

# What may stand where a secret would: moto's test credentials (tests, README), the placeholder
# docker/.env.example documents, and nothing else. References (${VAR}, $VAR, an ALL_CAPS variable's
# name) are not secrets; an empty value is not one either.
ALLOWED_SECRET_VALUES = {"testing", "change-me"}
SECRET_NAME = re.compile(r"(?i)passw(?:or)?d|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|fernet|credential")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
URL_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/@:'\"]+:([^\s/@'\"]+)@")
# key = value, key: value, "key": value, KEY=value; in Python only a quoted value is a literal.
ASSIGNMENT = re.compile(
    r"""(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)["']?\s*(?::|=(?!=))\s*(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s,;)}\]#]+)"""
)
PY_ENV_SET = re.compile(
    r"""(?:setenv|putenv|environ\.setdefault)\(\s*["'](?P<key>\w+)["']\s*,\s*(?P<value>"[^"\n]*"|'[^'\n]*')"""
    r"""|environ\[["'](?P<key2>\w+)["']\]\s*=\s*(?P<value2>"[^"\n]*"|'[^'\n]*')"""
)


def _repository_files() -> list[Path]:
    """What git tracks, and what it would commit next (untracked files that are not ignored)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def _normalized(line: str) -> str:
    line = re.sub(r"\$\{[^}]*\}", "$VAR", line)  # ${VAR}, ${VAR:?message with spaces}
    return re.sub(r""":'[A-Za-z_]\w*'|:"[A-Za-z_]\w*\"""", " $VAR", line)  # psql's :'variable'


def _is_reference_or_placeholder(value: str) -> bool:
    value = value.strip("\"'")
    return (
        not value
        or value.startswith("$")
        or value.startswith("{")
        or value in ALLOWED_SECRET_VALUES
        or re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", value) is not None
    )  # another variable's name, or PASSWORD in docs


def _secret_findings(path: Path, content: str) -> list[str]:
    found = []
    rel = path.relative_to(REPO).as_posix()
    python, markdown = path.suffix == ".py", path.suffix == ".md"
    for number, raw in enumerate(content.splitlines(), start=1):
        where = f"{rel}:{number}"
        if AWS_KEY_ID.search(raw):
            found.append(f"{where}: an AWS access key id")
        if PRIVATE_KEY.search(raw):
            found.append(f"{where}: a private key block")
        line = _normalized(raw)
        for match in URL_WITH_PASSWORD.finditer(line):
            if not _is_reference_or_placeholder(match.group(1)):
                found.append(f"{where}: a password in a URL")
        if markdown or (not python and line.lstrip().startswith(("#", "//", "--"))):
            continue  # prose and comments: "docker/.env holds secrets: it is ..." describes, it assigns nothing
        pairs = [(m["key"], m["value"]) for m in ASSIGNMENT.finditer(line)]
        if python:
            pairs = [(k, v) for k, v in pairs if v[:1] in "\"'"]
        pairs += [(m["key"] or m["key2"], m["value"] or m["value2"]) for m in PY_ENV_SET.finditer(line)]
        for key, value in pairs:
            if re.search(r"(?i)_(?:file|path|dir)$", key):
                continue  # where a secret is kept (..._PASSWORDS_FILE: /opt/...), not the secret
            if SECRET_NAME.search(key) and not _is_reference_or_placeholder(value):
                found.append(f"{where}: {key} is given a literal value")
    return found


def test_no_secret_in_the_repository(report):
    files = _repository_files()
    assert REPO / "tests" / "test_security.py" in files and len(files) > 50
    findings = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        findings += _secret_findings(path, data.decode("utf-8", errors="replace"))
    assert findings == []
    report.checked(
        f"{len(files)} files (git ls-files, plus untracked not ignored): no AWS key id, private key, "
        f"password in a URL, or secret-named key with a literal value (allowed: {sorted(ALLOWED_SECRET_VALUES)}, "
        "references, empty)"
    )
    if (REPO / "docker" / ".env.example").exists():  # the stack's real secrets live in docker/.env: never committed
        assert subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO).returncode == 0


# Planted secrets for the scanner's own test, written backwards so that the scan of this file passes.
PLANTED_BACKWARDS = [
    '"YEKELPMAXEYCifRxPbGDM7KIMEFntUXrlaJw" = YEK_SSECCA_TERCES_SWA',
    "2retnuh=DROWSSAP_SERGTSOP",
    '"eulav-t3rc3s" :drowssap    ',
    '"gatv/2345:moc.elpmaxe.bd@ssaplaer:gatv//:lqsergtsop" = lru',
    ')"ponmlkjihgfedcba" ,"YEK_TENREF__EROC__WOLFRIA"(vnetes.hctapyeknom',
    '"PONMLKJIHGFEDCBAAIKA" = di_yek_ssecca_swa',
    "-----YEK ETAVIRP ASR NIGEB-----",
]


@pytest.mark.parametrize("backwards", PLANTED_BACKWARDS, ids=[f"planted{i}" for i in range(len(PLANTED_BACKWARDS))])
def test_the_secret_scan_finds_planted_secrets(backwards):
    """The scanner itself: each planted secret is found (in a .py, .yaml or .env file alike)."""
    line = backwards[::-1]
    quoted = re.search(r"[\"']|-----", line)  # in Python an unquoted value is a variable, not a literal
    for name in ("planted.py", "planted.yaml", "planted.env") if quoted else ("planted.yaml", "planted.env"):
        path = REPO / "tests" / name  # only for the relative path in the message; nothing is written
        assert _secret_findings(path, f"# before\n{line}\n"), (name, line)
    for harmless in (
        'secret_access_key="testing"',
        "POSTGRES_PASSWORD=change-me",
        'PASSWORD: "${PG_PASSWORD:?set it}"',
        'conn = "postgresql://vtag:${VTAG_DB_PASSWORD}@postgres:5432/vtag"',
        '"AWS_SECRET_ACCESS_KEY": "MINIO_ROOT_PASSWORD"',
        "password=conn.password",
        "secret_access_key: str | None = None",
    ):
        assert _secret_findings(REPO / "tests" / "x.py", harmless) == [], harmless


DAG_ENVIRONMENT = {
    "VTAG_INGEST_CRON",
    "VTAG_NIGHTLY_CRON",
    "VTAG_NIGHTLY_START",
}  # schedule settings, read when the file is parsed
ASSET_URIS = {"x-vtag://yt8m/parquet"}  # Airflow asset identifiers, not services
CONNECTION_URL = re.compile(
    r"\b[a-z][a-z0-9+.-]*://(?:[^\s/@'\"]*@)?[A-Za-z0-9][A-Za-z0-9.-]*(?::\d+)?(?:/[^\s'\")]*)?"
)
HOST_OR_PORT = re.compile(
    r"\blocalhost\b|\b(?:\d{1,3}\.){3}\d{1,3}\b|\b[A-Za-z][A-Za-z0-9.-]*:\d{2,5}\b"
    r"|\b(?:host|port|login|password|schema)\s*="
)


def test_dag_files_hold_no_credentials_urls_or_hosts(report):
    dag_files = sorted((REPO / "dags").glob("*.py"))
    assert len(dag_files) >= 4
    for path in dag_files:
        source = path.read_text()
        assert _secret_findings(path, source) == []
        assert [u for u in CONNECTION_URL.findall(source) if u not in ASSET_URIS] == [], path.name
        assert HOST_OR_PORT.findall(source) == [], path.name
        tree = ast.parse(source)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            a.name.rsplit(".", 1)[-1]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        # Connections and variables are resolved in one place, airflow_glue/config.py, never in a DAG file.
        assert not names & {"Connection", "BaseHook", "Variable", "create_engine", "boto3"}, path.name
        read = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv"):
                read.add(node.args[0].value if isinstance(node.args[0], ast.Constant) else ast.unparse(node.args[0]))
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                read.add(ast.unparse(node.slice))
        assert read <= DAG_ENVIRONMENT, (path.name, read)
        if "db_url" in source or "s3_config" in source:  # a task that reaches a service gets it from airflow_config
            assert "from airflow_glue import config as cfg" in source and not re.search(r"db_url=(?!cfg\.)", source)
    report.checked(
        f"{len(dag_files)} DAG files: no credential, no connection URL (only the asset URIs {sorted(ASSET_URIS)}), "
        "no host or port, no Connection/Variable/engine/boto3 of their own, environment read only for "
        f"{sorted(DAG_ENVIRONMENT)}"
    )


# --- the analysts' role -----------------------------------------------------------------------------------

ANALYST = "vtag_analyst"
# What the SQL users run (sql/queries) needs, as the README documents it: predictions, their labels and
# run bookkeeping, the catalogue of videos and their ground truth, the production labels view.
ANALYST_READS = {
    "labels",
    "videos",
    "video_labels",
    "inference_runs",
    "inference_parts",
    "inference_label_counts",
    "predictions",
    "segment_predictions",
    "production_labels",
    "production_versions",
    "version_hits",
}


@pytest.mark.postgres
def test_analyst_role_reads_predictions_and_nothing_else(raw_shards, tiny_checkpoint, tmp_path, pg_url, report):
    world = build_world(raw_shards, tmp_path, pg_url, checkpoint=tiny_checkpoint)  # the role is PostgreSQL's
    first = run_inference(pg_url, NIGHT, top_k=2, exports_uri=world["exports"])
    login = f"vtag_test_analyst_{uuid.uuid4().hex[:8]}"  # an analyst's login, as the README says to grant it
    with engine_for(pg_url).begin() as conn:
        conn.execute(text(f"CREATE ROLE {login} LOGIN IN ROLE {ANALYST}"))
    analyst_url = pg_url.replace("://postgres@", f"://{login}@")
    analyst = create_engine(analyst_url)
    try:
        # Reads: every query users run, and each readable relation.
        params = _valid_params(pg_url, world["version"], first.run_id)
        for name in queries.available():
            _, needed = queries.describe(name)
            queries.run(analyst_url, name, {p: params[p] for p in needed})
        with analyst.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM production_labels")).scalar() == 100
            for relation in sorted(ANALYST_READS):
                conn.execute(text(f"SELECT * FROM {relation} LIMIT 1"))

        # The catalogue's view of every relation in the schema: exactly these readable, none writable.
        with engine_for(pg_url).connect() as conn:
            grants = conn.execute(
                text(
                    "SELECT c.relname, c.relkind, "
                    "  has_table_privilege(:r, c.oid, 'SELECT'), "
                    "  has_table_privilege(:r, c.oid, 'INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER') "
                    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'm', 'p', 'f')"
                ),
                {"r": ANALYST},
            ).all()
            sequences = conn.execute(
                text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = 'public' AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(:r, c.oid, 'USAGE,SELECT,UPDATE') END"
                ),
                {"r": ANALYST},
            ).all()
            schema_create = conn.execute(
                text("SELECT has_schema_privilege(:r, 'public', 'CREATE')"), {"r": ANALYST}
            ).scalar()
            database_create = conn.execute(
                text("SELECT has_database_privilege(:r, current_database(), 'CREATE')"), {"r": ANALYST}
            ).scalar()
        readable = {name for name, _, can_read, _ in grants if can_read}
        assert readable == ANALYST_READS
        assert [name for name, _, _, can_write in grants if can_write] == []
        assert sequences == [] and not schema_create and not database_create
        internal = sorted({name for name, *_ in grants} - ANALYST_READS)
        assert {"ingested_shards", "model_versions", "evaluations", "alembic_version"} <= set(internal)

        # And by trying, as the analyst's login: each statement is refused.
        attempts = [f"SELECT * FROM {t}" for t in internal] + [
            "INSERT INTO predictions (video_id, model_version, rank, label_id, score, run_id) VALUES ('x', 1, 99, 1, 0.5, 1)",
            "UPDATE predictions SET score = 0",
            "DELETE FROM predictions",
            "TRUNCATE predictions",
            "INSERT INTO labels (label_id, name) VALUES (99999, 'x')",
            "UPDATE labels SET name = 'x'",
            "DELETE FROM labels",
            "UPDATE inference_runs SET status = 'failed'",
            "DELETE FROM videos",
            "TRUNCATE video_labels",
            "UPDATE model_versions SET status = 'archived'",
            "DELETE FROM ingested_shards",
            "CREATE TABLE public.analyst_table (x int)",
            "CREATE VIEW public.analyst_view AS SELECT 1 AS x",
            "CREATE SCHEMA analyst_schema",
            "CREATE INDEX analyst_index ON predictions (score)",
            "ALTER TABLE predictions ADD COLUMN x int",
            "DROP TABLE predictions",
            "DROP VIEW production_labels",
            "GRANT SELECT ON model_versions TO PUBLIC",
            "SET ROLE postgres",
        ]
        refused = 0
        for statement in attempts:
            with analyst.connect() as conn:
                with pytest.raises(Exception, match="permission denied|must be owner") as caught:
                    conn.execute(text(statement))
                refused += 1
                assert "InsufficientPrivilege" in type(caught.value.orig).__name__, (statement, caught.value)
        assert count(pg_url, "SELECT COUNT(*) FROM predictions") == 100
        assert count(pg_url, "SELECT COUNT(*) FROM labels") == 3862
        report.injected(
            f"{len(attempts)} statements as login {login} (member of {ANALYST}): reads of the internal "
            f"tables {internal}, INSERT/UPDATE/DELETE/TRUNCATE, CREATE TABLE/VIEW/SCHEMA/INDEX, ALTER, DROP, "
            "GRANT, SET ROLE postgres"
        )
        report.checked(
            f"all {refused} refused with permission denied (InsufficientPrivilege), data intact; every "
            f"query in sql/queries runs for the role; it reads exactly {sorted(ANALYST_READS)}, "
            "writes nothing, creates nothing, uses no sequence"
        )
    finally:
        analyst.dispose()
        engine_for(analyst_url).dispose()
        with engine_for(pg_url).begin() as conn:
            conn.execute(text(f"DROP ROLE IF EXISTS {login}"))

    # Migration 0004 took back 0003's SELECT on the registry; `vtag db downgrade` gives it back and still works.
    def can_read(table):
        return count(pg_url, "SELECT has_table_privilege(:r, :t, 'SELECT')", r=ANALYST, t=table)

    assert cli.main(["db", "downgrade", "0003", "--db", pg_url]) == 0
    assert can_read("model_versions") and can_read("evaluations")
    assert cli.main(["db", "upgrade", "--db", pg_url]) == 0
    assert not can_read("model_versions") and not can_read("evaluations")
    assert cli.main(["db", "downgrade", "base", "--db", pg_url]) == 0
    engine_for(pg_url).dispose()
    assert inspect(engine_for(pg_url)).get_table_names() == ["alembic_version"]
    report.checked(
        "migrations: downgrade to 0003 re-grants model_versions/evaluations, upgrade revokes them, "
        "downgrade to base empties the schema"
    )


# --- SQL only with bound parameters ---------------------------------------------------------------------

INJECTIONS = ("x'); DROP TABLE predictions; --", "1; DROP TABLE predictions; --", "1 OR 1=1", "x' OR '1'='1")


def _valid_params(db_url: str, version: int, run_id: int) -> dict[str, str]:
    video = rows(db_url, "SELECT video_id FROM predictions ORDER BY video_id LIMIT 1")[0][0]
    label = rows(db_url, "SELECT label_id FROM predictions WHERE video_id = :v AND rank = 1", v=video)[0][0]
    return {
        "video_id": video,
        "k": "2",
        "label_id": str(label),
        "limit": "10",
        "run_id": str(run_id),
        "model_version": str(version),
        "old_version": str(version),
        "new_version": str(version),
    }


def _schema(db_url: str) -> dict[str, int]:
    engine_for(db_url).dispose()
    inspector = inspect(engine_for(db_url))
    names = inspector.get_table_names() + inspector.get_view_names()
    return {name: count(db_url, f'SELECT COUNT(*) FROM "{name}"') for name in names}  # names from the catalogue


def test_queries_bind_parameters_against_injection(raw_shards, tiny_checkpoint, tmp_path, db_url, capsys, report):
    world = build_world(raw_shards, tmp_path, db_url, checkpoint=tiny_checkpoint)
    first = run_inference(db_url, NIGHT, top_k=2, exports_uri=world["exports"])
    valid = _valid_params(db_url, world["version"], first.run_id)
    before = _schema(db_url)
    assert before["predictions"] == 100

    def vtag_query(name, params):  # the very path `vtag query NAME k=v ...` takes
        code = cli.main(["query", name, *(f"{k}={v}" for k, v in params.items()), "--db", db_url])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err

    tried = 0
    for name in queries.available():
        _, needed = queries.describe(name)
        code, lines, err = vtag_query(name, {p: valid[p] for p in needed})
        assert code == 0 and err == "" and len(lines) >= 1, (name, err)
        for param, kind in needed.items():
            for payload in INJECTIONS:
                code, lines, err = vtag_query(name, {**{p: valid[p] for p in needed}, param: payload})
                tried += 1
                if kind == "text":  # bound as a value: an id that matches nothing
                    assert code == 0 and len(lines) == 1, (name, param, payload, lines)  # the header alone
                else:  # refused before any SQL runs, naming the parameter
                    assert (
                        code == 2 and f"parameter {param} must be an integer" in err and len(err.splitlines()) == 1
                    ), err
        # A hostile parameter name is refused too.
        code, _, err = vtag_query(name, {**{p: valid[p] for p in needed}, "x; DROP TABLE predictions": "1"})
        assert code == 2 and "takes no parameter" in err
        tried += 1
    assert _schema(db_url) == before  # every table and view there, every row count unchanged
    text_params = sorted({p for n in queries.available() for p, k in queries.describe(n)[1].items() if k == "text"})
    assert text_params == ["video_id"]
    report.injected(
        f"{tried} `vtag query` calls over the {len(queries.available())} queries in sql/queries, each parameter "
        f"in turn given {list(INJECTIONS)}, and a hostile parameter name"
    )
    report.checked(
        f"text parameters {text_params} matched nothing (header only); integer ones refused with one line "
        f"naming the parameter; all {len(before)} tables and views intact, row counts unchanged"
    )


# Identifiers that may be formatted into SQL, each from a constant of its module (file: expressions).
SQL_IDENTIFIERS = {
    # COLUMNS: the predictions table's column names; table, partition, tables[0]: partition_name() or
    # part_table_name(), a constant prefix and ints, or names run_tables() matched to PART_TABLE; target:
    # one matched to PART_TABLE; version: an int; mode: '' or '_shared' (run_lock's advisory lock functions)
    "storage/database/run_locks.py": {"mode"},
    # parent: family(), one of the two tables nights write; marks: "?" per column; segment_writes' columns:
    # segment_rows.COLUMNS joined; partitions' columns: the schema's column names; base_name(), layer_name(),
    # layer_definition(): constant text and ints; runs: the ints layers() parsed; base, layer: base_name(),
    # layer_name() or an int; definition: layer_definition() or a constant and an int; values: ints joined
    "storage/database/partitions.py": {
        "table",
        "version",
        "parent",
        "partition",
        "columns",
        "', '.join(map(str, runs))",
        "int(run_id)",
        "base_name(version)",
        "partition_name(model_version)",
        "partition_name(version)",
        "layer_name(model_version, run_id)",
        "layer_name(version, run)",
        "layer_definition(model_version, run_id)",
        "layer_definition(version)",
        "values",
    },
    "storage/database/segment_writes.py": {"table", "columns"},
    "storage/database/prediction_writes.py": {
        "columns",
        "marks",
        "parent",
        "table",
        "tables[0]",
        "target",
        "version",
        "base",
        "int(run_id)",
        "layer.table",
        "'predictions' if layer is None else layer.table",
        "layer_definition(version, run_id)",
    },
    "sql/migrations/versions/0003_predictions.py": {"ANALYST_ROLE", "', '.join(READABLE)"},
    "sql/migrations/versions/0004_analyst_reads_predictions_only.py": {"ANALYST_ROLE", "', '.join(INTERNAL)"},
    "sql/migrations/versions/0005_predictions_at_scale.py": {
        "ANALYST_ROLE",
        "', '.join(NEW_READABLE)",
        "COLUMNS",
        "int(version)",
    },
    # names of pg_class matched to a fixed pattern, an int parsed from one, and the column names
    "sql/migrations/versions/0017_night_layers.py": {
        "COLUMNS",
        "base",
        "layer",
        "partition",
        "table",
        "version",
        "run",
    },
}
SQL_TEXT = re.compile(
    r"\b(?:SELECT|INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(?:TABLE|VIEW|INDEX|ROLE|"
    r"SCHEMA|TEMP|DATABASE)|DROP\s+(?:TABLE|VIEW|INDEX|ROLE|DATABASE)|COPY\s+\w+|TRUNCATE|ALTER\s+TABLE|GRANT|"
    r"REVOKE|WHERE|VALUES)\b"
)


def _formatted_sql(source: str) -> list[tuple[int, str]]:
    """(line, formatted expression) for every value formatted into SQL text: f-strings, str.format, %, +."""
    tree, found = ast.parse(source), []

    def literal_text(node) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        return ""

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and SQL_TEXT.search(literal_text(node)):
            found += [(node.lineno, ast.unparse(v.value)) for v in node.values if isinstance(v, ast.FormattedValue)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and SQL_TEXT.search(literal_text(node.func.value))
        ):
            found += [(node.lineno, ast.unparse(a)) for a in [*node.args, *(k.value for k in node.keywords)]]
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, (ast.Mod, ast.Add))
            and (SQL_TEXT.search(literal_text(node.left)) or SQL_TEXT.search(literal_text(node.right)))
        ):
            found.append(
                (node.lineno, ast.unparse(node.right if SQL_TEXT.search(literal_text(node.left)) else node.left))
            )
    return found


def test_sql_is_never_built_from_values(report):
    files = sorted(p for folder in ("tasks", "storage", "model", "sql") for p in (REPO / folder).rglob("*.py"))
    formatted = {p.relative_to(REPO).as_posix(): _formatted_sql(p.read_text()) for p in files}
    unexpected = [
        (f, line, expr)
        for f, found in formatted.items()
        for line, expr in found
        if expr not in SQL_IDENTIFIERS.get(f, set())
    ]
    assert unexpected == []
    # The allowed identifiers really are constants of their modules.
    from storage.database import partitions, prediction_writes

    assert isinstance(prediction_writes.COLUMNS, tuple) and all(c.isidentifier() for c in prediction_writes.COLUMNS)
    assert partitions.partition_name("3") == "predictions_v3"
    assert partitions.part_table_name(3, "12", 0) == "predictions_v3_run12_part0"
    assert not partitions.PART_TABLE.fullmatch("predictions_v3_run1; DROP TABLE predictions")
    assert (partitions.base_name("3"), partitions.layer_name(3, "12")) == (
        "predictions_v3_base",
        "predictions_v3_night12",
    )
    for unsafe in (
        partitions.partition_name,
        partitions.base_name,
        lambda bad: partitions.layer_name(3, bad),
        lambda bad: partitions.layer_definition(3, bad),
    ):
        with pytest.raises(ValueError):
            unsafe("1; DROP TABLE predictions")
    with pytest.raises(ValueError):
        partitions.family("predictions; DROP TABLE predictions")
    from storage.formats import segment_rows

    assert all(c.isidentifier() for c in segment_rows.COLUMNS)
    for migration, names in (
        ("0003_predictions.py", ("ANALYST_ROLE", "READABLE")),
        ("0004_analyst_reads_predictions_only.py", ("ANALYST_ROLE", "INTERNAL")),
        ("0005_predictions_at_scale.py", ("ANALYST_ROLE", "NEW_READABLE", "COLUMNS")),
    ):
        module = ast.parse((REPO / "sql/migrations/versions" / migration).read_text())
        constants = {
            t.id: n.value
            for n in module.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        for name in names:
            assert isinstance(constants[name], (ast.Constant, ast.Tuple)), (migration, name)
    # The check finds what it is meant to find.
    for bad in (
        "q = f\"SELECT * FROM videos WHERE video_id = '{video}'\"",
        'q = "DELETE FROM labels WHERE label_id = %s" % label',
        'q = "SELECT name FROM labels WHERE label_id = {}".format(i)',
        'q = "SELECT 1 FROM videos WHERE video_id = \'" + v + "\'"',
    ):
        assert _formatted_sql(bad), bad
    uses = sum(len(v) for v in formatted.values())
    report.checked(
        f"{len(files)} files under tasks/ storage/ model/ sql/: {uses} values formatted into SQL text, all "
        f"identifiers from constants: {sorted((f, e) for f, s in SQL_IDENTIFIERS.items() for e in s)}; "
        "every other value is bound"
    )


# --- trigger-form inputs validated by Airflow ----------------------------------------------------------

VALID = {
    "yt8m_nightly_inference": [
        {},
        {"top_k": 1},
        {"top_k": 3862},
        {"level": "video"},
        {"model_version": 3},
        {"video_ids": ["abcd", "Xy-9_z"]},
        {"shard_pattern": "train00*.parquet"},
        {"dry_run": True},
    ],
    "yt8m_ingest": [
        {},
        {"src": "/data/raw", "dest": "s3://yt8m/parquet"},
        {"src": "file:///data/raw"},
        {"dest": ""},
        {"pattern": "train*.tfrecord", "force": True},
    ],
    "yt8m_train": [
        {},
        {"data": "s3://yt8m/parquet", "level": "video", "preset": "video"},
        {"epochs": 2, "max_frames": 300},
        {"learning_rate": 0.001, "batch_size": 8},
        {"resume_checkpoint": "/models/run/last.pt"},
        {"train_split": "validate", "eval_pattern": "validate003?.parquet"},
    ],
}
INVALID = {
    "yt8m_nightly_inference": [
        {"top_k": 0},
        {"top_k": 5000},
        {"top_k": "20"},
        {"top_k": 2.5},
        {"level": "audio"},
        {"video_ids": ["ab'cd"]},
        {"video_ids": ["ab cd"]},
        {"video_ids": ["x" * 33]},
        {"video_ids": [""]},
        {"video_ids": "abcd"},
        {"model_version": 0},
        {"dry_run": "yes"},
    ],
    "yt8m_ingest": [
        {"src": "relative/raw"},
        {"src": "gs://bucket/raw"},
        {"src": "http://evil.example/raw"},
        {"dest": "s3://"},
        {"dest": "/data/parquet\n; rm -rf /"},
        {"src": 7},
        {"pattern": ""},
        {"force": "yes"},
    ],
    "yt8m_train": [
        {"level": "audio"},
        {"preset": "huge"},
        {"epochs": 0},
        {"max_frames": 301},
        {"learning_rate": 0},
        {"data": "relative/parquet"},
        {"resume_checkpoint": "ftp://host/last.pt"},
        {"train_split": "all"},
        {"checkpoint_every": -1},
        {"eval_pattern": ""},
    ],
}


def _api_server_validates(serialized, conf: dict) -> None:
    """What the API server does when a run is triggered (SerializedDAG.create_dagrun)."""
    serialized.params.deep_merge(conf).validate()


def _task_runner_validates(dag, conf: dict) -> None:
    """What the task runner does: the DAG's params updated with the run's conf (SDK ParamsDict)."""
    params = copy.deepcopy(dag.params)
    params.update(conf)
    params.validate()


@pytest.mark.airflow
def test_trigger_form_inputs_are_validated_by_airflow(dagbag, report):
    from airflow.exceptions import ParamValidationError
    from airflow.sdk.exceptions import ParamValidationError as SdkParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    checked = 0
    for dag_id in VALID:
        dag = dagbag.get_dag(dag_id)
        serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        for conf in VALID[dag_id]:
            _api_server_validates(serialized, conf)
            _task_runner_validates(dag, conf)
            checked += 1
        for conf in INVALID[dag_id]:
            (param,) = conf
            with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}"):
                _api_server_validates(serialized, conf)
            with pytest.raises(SdkParamValidationError, match=f"Invalid input for param {param}"):
                _task_runner_validates(dag, conf)
            checked += 1
    report.injected(
        f"{sum(map(len, INVALID.values()))} invalid trigger confs (top_k 0 / 5000 / '20', ids with a quote, "
        "a space or 33 characters, levels and presets outside the enum, relative and foreign-scheme URIs, "
        "a URI with a newline, ...) and {} valid ones".format(sum(map(len, VALID.values())))
    )
    report.checked(
        f"{checked} confs through Airflow's own validation, both where the API server checks a trigger "
        "(serialized DAG, deep_merge().validate()) and where the task runner does (SDK ParamsDict): every "
        "invalid one refused naming its param, every valid one accepted"
    )
