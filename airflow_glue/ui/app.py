"""The Video tags pages: models, nights and tags, server-rendered, behind Airflow's own login.

Every route depends on Airflow's GetUserDep: a request without the UI's `_token` cookie or a Bearer token is
refused (401/403) before any of our code runs. Files are streamed only from URIs the database holds or
derives (a plot's plot_uri, the loss plot beside a checkpoint, a night's exports), looked up by name.
"""

import csv
import io
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from airflow_glue import config as airflow_config
from airflow_glue.ui import charts, formatting, progress
from storage.database import db, registry, views
from storage.formats.exports import CSV_NAME, PICKLE_NAME, night_folder
from storage.formats.segment_exports import SUBMISSION_NAME
from storage.objectstore import StoreError, join, store_for
from tasks import queries, settings

PREFIX = "/video-tags"
NIGHTS_PER_PAGE = 50
POLL_MS = 5000  # a running night's page asks for its figures this often
TOP_LABELS = 20
TAG_ROWS = 50
LOSS_PLOT = "loss.png"  # model/train.py writes it beside the checkpoints

# A version or run id in a path: beyond the integer columns it can name nothing (422, never the database's 500).
RowId = Annotated[int, PathParam(ge=1, le=queries.INTEGER_COLUMN)]

# What Airflow's viewers may do, on every page: read DAGs and their runs. Logged in is not enough: a user
# the auth manager gives no such permission is refused (403), as Airflow's own UI refuses them.
app = FastAPI(title="Video tags", dependencies=[Depends(requires_access_dag(method="GET"))])
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)
templates.filters.update(formatting.FILTERS)


def _page(template: str, title: str, **values) -> HTMLResponse:
    section = values.pop("section", None) or SECTIONS.get(template.removesuffix(".html"))
    return HTMLResponse(templates.get_template(template).render(title=title, root=PREFIX, section=section, **values))


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


METRICS = [("gap", "GAP"), ("hit_at_one", "Hit@1"), ("perr", "PERR"), ("map", "mAP")]


def _against(conn, model: dict, production: dict | None) -> dict | None:
    """A version beside production on the same videos: both evaluations and the classes that gained and
    lost most; None when there is nothing to compare (it is production, or they share no evaluation set)."""
    mine = model.get("evaluation")
    if production is None or mine is None or model["version"] == production["version"]:
        return None
    theirs = (
        views.latest_evaluation(conn, production["version"], mine["set_fingerprint"])
        if mine["set_fingerprint"]
        else None
    )
    if theirs is None:
        return {"production": production, "mine": mine, "theirs": None}
    deltas = views.class_deltas(conn, mine["id"], theirs["id"])
    return {"production": production, "mine": mine, "theirs": theirs, **deltas}


def _history(conn, level: str, anchor: dict | None) -> str:
    """The level's versions over time on the videos of `anchor` (production's latest evaluation)."""
    if anchor is None or anchor.get("set_fingerprint") is None:
        return charts.lines([], METRICS)
    return charts.lines(views.version_history(conn, level, anchor["set_fingerprint"]), METRICS)


@app.get("/models", response_class=HTMLResponse)
def models_page(user: GetUserDep):
    sides = {}
    with db.transaction(_db()) as conn:
        models = views.models(conn)
        for level in ("frame", "video"):
            mine = [m for m in models if m["level"] == level]
            if not mine:
                continue
            production = next((m for m in mine if m["status"] == "production"), None)
            newer = [
                m
                for m in mine
                if m["status"] != "production" and (not production or m["version"] > production["version"])
            ]
            candidate = newer[0] if newer else None
            anchor = (production or mine[0])["evaluation"]
            sides[level] = {
                "production": production,
                "candidate": candidate,
                "against": _against(conn, candidate, production) if candidate else None,
                "history": _history(conn, level, anchor),
            }
    return _page("models.html", "Models", models=models, sides=sides, metrics=METRICS)


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
    with db.transaction(_db()) as conn:
        model = _found(views.model(conn, version), f"model version {version}")
        production = registry.production(conn, model["level"])
        model["evaluation"] = model["evaluations"][0] if model["evaluations"] else None
        against = _against(conn, model, production)
    return _page(
        "model.html", f"Model version {version}", m=model, plots=sorted(_plots(model)), against=against, metrics=METRICS
    )


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


def _progress(run: dict) -> dict:
    """The night's progress, with each figure also as the page shows it (the page's script writes those in
    as text while the night runs)."""
    figures = progress.night_progress(run, settings.night_deadline())
    shown = {
        "status": figures["status"],
        "parts": f"{figures['parts_done']:,} of {figures['parts_total']:,}"
        + (f" ({figures['parts_failed']:,} failed)" if figures["parts_failed"] else ""),
        "videos": f"{figures['videos_done']:,} of {figures['videos_total']:,}",
        "percent": formatting.percent(figures["fraction"]),
        "rows": formatting.count(figures["rows_written"]),
        "rate": f"{figures['videos_per_s']:,.1f} videos/s" if figures["videos_per_s"] else "",
        "elapsed": formatting.duration(figures["elapsed_s"]),
        "eta": formatting.when_text(figures["eta"]),
        "deadline": _deadline_shown(figures),
    }
    return {**figures, "shown": shown}


def _deadline_shown(figures: dict) -> str:
    """While the night runs: when it is due (late if the estimate passes it); once finished: met or missed."""
    due = figures["deadline"]
    if due is None:
        return ""
    if figures["status"] == "running":
        return formatting.when_text(due) + (" (late at this rate)" if figures["late"] else "")
    return f"{'missed' if figures['late'] else 'met'}: due {due:%Y-%m-%d %H:%M:%S} UTC"


@app.get("/nights/{run_id}/progress")
def night_progress(run_id: RowId, user: GetUserDep) -> dict:
    """The night page's live figures (it asks every few seconds while the night runs)."""
    figures = _progress(_night(run_id))
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in figures.items()}


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
        progress=_progress(run),
        poll_ms=POLL_MS,
        airflow_run=progress.airflow_run_path(run),
        exports=sorted(_exports(run)),
        chart=charts.bars(named),
        delta=charts.bars(deltas, signed=True),
        previous=previous,
    )


@app.get("/nights/{run_id}/exports/{name}")
def night_export(run_id: RowId, name: str, user: GetUserDep):
    return _download(f"inference run {run_id}", "export", _exports(_night(run_id)), name)


SECTIONS = {"models": "Models", "model": "Models", "nights": "Nights", "night": "Nights"}


def _query(name: str, params: dict) -> dict:
    """A shared query of sql/queries run as `vtag query` runs it: its columns, rows, the SQL itself (so an
    analyst can take it to psql) and the parameters it was given."""
    columns, rows = queries.run(_db(), name, params)
    return {
        "name": name,
        "columns": columns,
        "rows": rows,
        "sql": queries.available()[name].read_text(),
        "params": params,
    }


def _csv(result: dict, filename: str) -> Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result["columns"])
    writer.writerows(result["rows"])
    return Response(
        buffer.getvalue(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


VideoId = Annotated[str, PathParam(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
LabelId = Annotated[int, PathParam(ge=0, le=queries.MAX_LABELS - 1)]


@app.get("/tags", response_class=HTMLResponse)
def tags_page(user: GetUserDep, q: str | None = None, video: str | None = None, label: str | None = None):
    """Search: a video id or a label (by name or id). `video=` and `label=` open the video's or label's page."""
    if video:
        return RedirectResponse(f"{PREFIX}/tags/videos/{quote(video.strip(), safe='')}", status_code=303)
    text = (q or label or "").strip()
    if not text:
        return _page("tags.html", "Tags", section="Tags", q="", found=[], error=None)
    with db.transaction(_db()) as conn:
        if re.fullmatch(r"-?\d+", text) and label is not None:
            label_id = int(text)
        else:
            label_id = views.label_by_name(conn, text)
        if label_id is None and label is None and views.video(conn, text) is not None:
            return RedirectResponse(f"{PREFIX}/tags/videos/{quote(text, safe='')}", status_code=303)
        found = views.suggestions(conn, text) if label_id is None else []
    if label_id is not None:
        if not 0 <= label_id < queries.MAX_LABELS:
            return _page(
                "tags.html",
                "Tags",
                section="Tags",
                q=text,
                found=[],
                error=f"parameter label_id must be an integer from 0 to {queries.MAX_LABELS - 1}, not {text!r}",
            )
        return RedirectResponse(f"{PREFIX}/tags/labels/{label_id}", status_code=303)
    error = None if found else f"no video or label matches {text!r}"
    return _page("tags.html", "Tags", section="Tags", q=text, found=found, error=error)


@app.get("/tags/suggest")
def tags_suggest(user: GetUserDep, q: str = Query("", max_length=200)) -> list[dict]:
    """What the search box offers while one types: labels by name, video ids by prefix."""
    with db.transaction(_db()) as conn:
        return views.suggestions(conn, q)


def _video(video_id: str) -> dict:
    with db.transaction(_db()) as conn:
        found = views.video(conn, video_id)
    if found is None:
        raise HTTPException(404, f"no video {video_id!r} in the catalogue: ingest its shard, or check the id")
    return found


def _video_labels(video_id: str) -> dict:
    return _query("video_top_labels", {"video_id": video_id, "k": TAG_ROWS})


@app.get("/tags/videos/{video_id}", response_class=HTMLResponse)
def video_page(video_id: VideoId, user: GetUserDep):
    found = _video(video_id)
    values = {"v": found, "labels": _video_labels(video_id), "segments": _segments(video_id)}
    return _page("video.html", f"Video {video_id}", section="Tags", **values)


@app.get("/tags/videos/{video_id}/labels.csv")
def video_csv(video_id: VideoId, user: GetUserDep):
    _video(video_id)
    return _csv(_video_labels(video_id), f"video-{video_id}-labels.csv")


def _label(label_id: int) -> tuple[dict, list[dict]]:
    """The label's vocabulary row and its latest nights; a 404 for a label neither knows."""
    with db.transaction(_db()) as conn:
        found = views.label(conn, label_id)
        nights = views.label_nights(conn, label_id)
    if found is None and not nights:
        raise HTTPException(404, f"no label {label_id}: load the vocabulary (vtag vocabulary)")
    return found or {"label_id": label_id, "name": ""}, nights


def _label_videos(label_id: int) -> dict:
    return _query("label_top_videos", {"label_id": label_id, "limit": TAG_ROWS})


@app.get("/tags/labels/{label_id}", response_class=HTMLResponse)
def label_page(label_id: LabelId, user: GetUserDep):
    found, nights = _label(label_id)
    for night in nights:
        night["precision"] = night["hits"] / night["judged"] if night["judged"] else None
    chart = charts.bars([(f"{n['logical_date']:%Y-%m-%d} run {n['run_id']}", int(n["videos"])) for n in nights[:14]])
    values = {"label": found, "top": _label_videos(label_id), "nights": nights, "chart": chart}
    return _page("label.html", found["name"] or f"label {label_id}", section="Tags", **values)


@app.get("/tags/labels/{label_id}/videos.csv")
def label_csv(label_id: LabelId, user: GetUserDep):
    _label(label_id)
    return _csv(_label_videos(label_id), f"label-{label_id}-videos.csv")


def _segments(video: str) -> dict:
    """The video's segments (sql/queries/video_segments.sql) as a table and on a timeline."""
    result = _query("video_segments", {"video_id": video})
    found = [dict(zip(result["columns"], r)) for r in result["rows"]]
    for s in found:
        s["label"] = s["label_name"] or f"label {s['label_id']}"
    return {**result, "found": found, "chart": charts.timeline(found)}
