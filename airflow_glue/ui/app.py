"""The Video tags pages: models, nights and tags, server-rendered, behind Airflow's own login.

Every route depends on Airflow's GetUserDep: a request without the UI's `_token` cookie or a Bearer token is
refused (401/403) before any of our code runs. Files are streamed only from URIs the database holds or
derives (a plot's plot_uri, the loss plot beside a checkpoint, a night's exports), looked up by name.
"""

import re
from pathlib import Path
from typing import Annotated

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from airflow_glue import config as airflow_config
from airflow_glue.ui import charts
from storage.database import db, views
from storage.formats.exports import CSV_NAME, PICKLE_NAME, night_folder
from storage.formats.segment_exports import SUBMISSION_NAME
from storage.objectstore import StoreError, join, store_for
from tasks import queries

PREFIX = "/video-tags"
NIGHTS_PER_PAGE = 50
TOP_LABELS = 20
TAG_ROWS = 50
LOSS_PLOT = "loss.png"  # model/train.py writes it beside the checkpoints

# A version or run id in a path: beyond the integer columns it can name nothing (422, never the database's 500).
RowId = Annotated[int, PathParam(ge=1, le=queries.INTEGER_COLUMN)]

app = FastAPI(title="Video tags")
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)


def _page(template: str, title: str, **values) -> HTMLResponse:
    return HTMLResponse(templates.get_template(template).render(title=title, root=PREFIX, **values))


def _db() -> str:
    return airflow_config.db_url()


def _stream(uri: str, name: str) -> StreamingResponse:
    store = store_for(uri, airflow_config.s3_config())
    try:
        f = store.open_read(uri)
    except (StoreError, OSError) as exc:
        raise HTTPException(404, f"{name} is not in the object store") from exc

    def chunks():
        with f:
            while chunk := f.read(1 << 16):
                yield chunk

    kind = "image/png" if name.endswith(".png") else "text/csv" if name.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=kind, headers={"Content-Disposition": f'inline; filename="{name}"'})


@app.get("/", response_class=HTMLResponse)
def index(user: GetUserDep):
    return _page("index.html", "Video tags")


@app.get("/models", response_class=HTMLResponse)
def models_page(user: GetUserDep):
    with db.transaction(_db()) as conn:
        models = views.models(conn)
    sides = {}
    for level in ("frame", "video"):
        mine = [m for m in models if m["level"] == level]
        production = next((m for m in mine if m["status"] == "production"), None)
        newer = [
            m for m in mine if m["status"] != "production" and (not production or m["version"] > production["version"])
        ]
        sides[level] = {"production": production, "newest candidate": newer[0] if newer else None}
    return _page("models.html", "Models", models=models, sides=sides)


def _plots(model: dict) -> dict[str, str]:
    """name -> URI of the version's plots: its evaluations' plot_uri and its own loss curve (loss_plot_uri);
    a version registered before that was recorded shows its training folder's loss.png, if any."""
    plots = {uri.rsplit("/", 1)[-1]: uri for uri in (e["plot_uri"] for e in model["evaluations"]) if uri}
    if model.get("loss_plot_uri"):
        plots[LOSS_PLOT] = model["loss_plot_uri"]
        return plots
    loss = join(model["checkpoint_uri"].rsplit("/", 1)[0], LOSS_PLOT)
    try:
        if store_for(loss, airflow_config.s3_config()).exists(loss):
            plots[LOSS_PLOT] = loss
    except StoreError:
        pass
    return plots


def _found(row: dict | None, what: str) -> dict:
    if row is None:
        raise HTTPException(404, f"no {what}")
    return row


def _model(version: int) -> dict:
    with db.transaction(_db()) as conn:
        return _found(views.model(conn, version), f"model version {version}")


@app.get("/models/{version}", response_class=HTMLResponse)
def model_page(version: RowId, user: GetUserDep):
    model = _model(version)
    return _page("model.html", f"Model version {version}", m=model, plots=sorted(_plots(model)))


@app.get("/models/{version}/plots/{name}")
def model_plot(version: RowId, name: str, user: GetUserDep):
    return _download(f"model version {version}", "plot", _plots(_model(version)), name)


def _download(owner: str, kind: str, files: dict[str, str], name: str):
    """One of `owner`'s files by name, or a 404 listing the ones it has."""
    if name not in files:
        raise HTTPException(404, f"{owner} has no {kind} {name!r} (it has: {', '.join(files)})")
    return _stream(files[name], name)


def _duration(run: dict):
    if run["finished_at"] and run["started_at"]:
        return run["finished_at"] - run["started_at"]
    return None


@app.get("/nights", response_class=HTMLResponse)
def nights_page(
    user: GetUserDep,
    page: int | None = Query(None, ge=1, le=queries.INTEGER_COLUMN, description="show runs older than this run_id"),
):
    with db.transaction(_db()) as conn:
        runs = views.nights(conn, before=page, limit=NIGHTS_PER_PAGE)
    for run in runs:
        run["duration"] = _duration(run)
    next_page = runs[-1]["run_id"] if len(runs) == NIGHTS_PER_PAGE else None
    return _page("nights.html", "Nights", runs=runs, next_page=next_page)


def _exports(run: dict) -> dict[str, str]:
    """name -> URI of a night's exports, in the folder its run row records. A run from before that was
    recorded: where the DAG writes (`<yt8m_exports_uri>/<logical date>`), then where `vtag infer` does
    (`<exports>/<logical date>_v<version>`)."""
    root, when, s3 = airflow_config.exports_uri(), run["logical_date"], airflow_config.s3_config()
    folders = [run["exports_uri"]] if run.get("exports_uri") else [night_folder(root, when), night_folder(root, when, run["model_version"])]  # fmt: skip
    for folder in folders:
        found = {}
        for name in (CSV_NAME, PICKLE_NAME, SUBMISSION_NAME):
            uri = join(folder, name)
            try:
                if store_for(uri, s3).exists(uri):
                    found[name] = uri
            except StoreError:
                pass
        if found:
            return found
    return {}


def _night(run_id: int) -> dict:
    with db.transaction(_db()) as conn:
        return _found(views.night(conn, run_id), f"inference run {run_id}")


@app.get("/nights/{run_id}", response_class=HTMLResponse)
def night_page(run_id: RowId, user: GetUserDep):
    with db.transaction(_db()) as conn:
        run = _found(views.night(conn, run_id), f"inference run {run_id}")
        counts = views.rank_one_counts(conn, run_id)
        previous = views.previous_night(conn, run_id, run["model_version"], run["logical_date"])
        before = views.rank_one_counts(conn, previous) if previous else {}
        top = sorted(counts, key=lambda label: (-counts[label], label))[:TOP_LABELS]
        names = views.label_names(conn, top)
    run["duration"] = _duration(run)
    named = [(f"{label} {names.get(label, '')}".strip(), counts[label]) for label in top]
    deltas = [(name, counts[label] - before.get(label, 0)) for (name, _), label in zip(named, top)] if previous else []
    return _page(
        "night.html",
        f"Night {run_id}",
        r=run,
        exports=sorted(_exports(run)),
        chart=charts.bars(named),
        delta=charts.bars(deltas, signed=True),
        previous=previous,
    )


@app.get("/nights/{run_id}/exports/{name}")
def night_export(run_id: RowId, name: str, user: GetUserDep):
    return _download(f"inference run {run_id}", "export", _exports(_night(run_id)), name)


@app.get("/tags", response_class=HTMLResponse)
def tags_page(user: GetUserDep, video: str | None = None, label: str | None = None):
    """The shared queries of sql/queries (queries.run), so the page shows what `vtag query` shows."""
    columns, rows, error, segments = [], [], None, None
    try:
        if video:
            columns, rows = queries.run(_db(), "video_top_labels", {"video_id": video, "k": TAG_ROWS})
            segments = _segments(video)
        elif label:
            label_id = label if re.fullmatch(r"\s*-?\d+\s*", label) else _label_id(label)
            columns, rows = queries.run(_db(), "label_top_videos", {"label_id": label_id, "limit": TAG_ROWS})
    except queries.QueryError as exc:
        error = str(exc)
    return _page(
        "tags.html", "Tags", video=video, label=label, columns=columns, rows=rows, error=error, segments=segments
    )


def _segments(video: str) -> dict:
    """The video's segments (sql/queries/video_segments.sql) as a table and on a timeline."""
    columns, rows = queries.run(_db(), "video_segments", {"video_id": video})
    found = [dict(zip(columns, r)) for r in rows]
    for s in found:
        s["label"] = s["label_name"] or f"label {s['label_id']}"
    return {"columns": columns, "rows": rows, "chart": charts.timeline(found)}


def _label_id(name: str) -> int:
    with db.transaction(_db()) as conn:
        label_id = views.label_by_name(conn, name)
    if label_id is None:
        raise queries.QueryError(f"parameter label: no label named {name!r}")
    return label_id
