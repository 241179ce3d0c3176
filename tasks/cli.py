"""The `vtag` command line: the same work the DAG tasks do, without Airflow."""

import argparse
import logging
import os
import sys
from datetime import UTC, datetime

from storage.errors import UsageError
from storage.formats.yt8m_spec import LEVELS
from tasks import settings
from tasks.cli_arguments import db_arg, iso_date, lock_timeout_arg, precision_arg, segment_method_arg

EXIT_USAGE = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtag", description="YouTube-8M video tagging pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for arguments in COMMANDS:
        arguments(sub)
    return parser


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _synth_arguments(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic YouTube-8M shards in Google's TFRecord format")
    p.add_argument("--out", required=True, metavar="URI")
    p.add_argument("--level", choices=list(LEVELS), default="frame")
    p.add_argument("--split", choices=["train", "validate", "test"], default="train")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--videos-per-shard", type=int, default=100)
    p.add_argument("--num-labels", type=int, default=50, help="size of the label pool (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segments", action="store_true", help="frame level: rated 5-second segments, as the 3rd edition's")
    p.set_defaults(handler=_synth)


def _synth(args) -> int:
    from tasks.synth import SynthConfig, synth

    config = SynthConfig(
        args.level, args.split, args.shards, args.videos_per_shard, args.num_labels, args.seed, args.segments
    )
    for uri in synth(args.out, config):
        print(uri)
    return 0


def _ingest_arguments(sub) -> None:
    p = sub.add_parser("ingest", help="convert TFRecord shards to the Parquet layout")
    p.add_argument("--src", default=None, metavar="URI", help="folder of shards (default: $VTAG_RAW_URI)")
    p.add_argument(
        "--dest", default=None, metavar="URI", help="root of the Parquet layout (default: $VTAG_PARQUET_URI)"
    )
    p.add_argument("--pattern", default="*.tfrecord", help="glob on shard names (default *.tfrecord)")
    p.add_argument("--force", action="store_true", help="convert again even unchanged shards")
    p.add_argument(
        "--replace",
        action="store_true",
        help="let a shard replace the Parquet file another source converted to the same name",
    )
    db_arg(p)
    p.set_defaults(handler=_ingest)


def _ingest(args) -> int:
    from tasks.ingest import ingest

    src = args.src or settings.default_raw_uri()
    dest = args.dest or settings.default_parquet_uri()
    report = ingest(src, dest, args.db, args.pattern, args.force, replace=args.replace)
    for result in report.converted:
        print(f"converted {result['source_uri']} -> {result['output_uri']} ({result['rows']} videos)")
    print(f"{len(report.converted)} converted, {report.skipped} already converted, {len(report.failed)} failed")
    for uri, error in report.failed.items():
        print(f"FAILED {uri}: {error}", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0


def _train_arguments(sub) -> None:
    p = sub.add_parser("train", help="train a model on the Parquet layout and register it")
    p.add_argument(
        "--data", default=None, metavar="URI", help="root of the Parquet layout (default: $VTAG_PARQUET_URI)"
    )
    p.add_argument("--level", choices=list(LEVELS), required=True)
    p.add_argument(
        "--preset",
        default=None,
        help="model/presets.toml section (default: seed on a GPU, small on a CPU; video for video level)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--seed", type=int)
    precision_arg(p, scoring=False)
    p.add_argument("--split", default="train", help="split to train on (default train)")
    p.add_argument("--pattern", default="*.parquet", help="glob on the split's file names")
    p.add_argument("--resume", metavar="CHECKPOINT_URI", help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help="also checkpoint every N steps")
    p.add_argument(
        "--out", required=True, metavar="URI", help="folder for this run's checkpoints; a checkpoint there is continued"
    )
    db_arg(p)
    p.set_defaults(handler=_train)


def _train(args) -> int:
    from tasks.training import train_and_register

    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "max_frames": args.max_frames,
        "num_workers": args.workers,
        "seed": args.seed,
        "precision": args.precision,
    }
    result = train_and_register(
        args.data or settings.default_parquet_uri(),
        args.out,
        args.level,
        args.db,
        preset=args.preset,
        overrides=overrides,
        split=args.split,
        pattern=args.pattern,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        progress=sys.stderr.isatty(),
    )
    if result["version"] is None:  # another rank than 0 under torchrun: rank 0 reports
        return 0
    print(
        f"model version {result['version']}: {result['checkpoint_uri']} ({result['epochs']} epochs, "
        f"{result['steps']} steps, {result['videos_per_second']:.1f} videos/s)"
    )
    return 0


def _finetune_arguments(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a frame-level checkpoint on a split's rated segments and register the result"
    )
    p.add_argument("--checkpoint", required=True, metavar="URI", help="the trained frame-level model to start from")
    p.add_argument(
        "--data", default=None, metavar="URI", help="root of the Parquet layout (default: $VTAG_PARQUET_URI)"
    )
    p.add_argument("--split", default="validate", help="whose rated segments (default validate, as Google rates)")
    p.add_argument("--pattern", default="*.parquet")
    p.add_argument("--out", required=True, metavar="URI", help="folder for the fine-tuned checkpoint")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64, help="videos a step (their rated segments together)")
    db_arg(p)
    p.set_defaults(handler=_finetune)


def _finetune(args) -> int:
    from tasks.training import finetune_segments

    tuned = finetune_segments(
        args.checkpoint,
        args.data or settings.default_parquet_uri(),
        args.out,
        args.db,
        split=args.split,
        pattern=args.pattern,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
    )
    print(
        f"model version {tuned['version']}: {tuned['checkpoint_uri']} (fine-tuned on the rated segments of "
        f"{args.split}: {tuned['epochs']} epochs, {tuned['steps']} steps, last epoch's loss {tuned['final_loss']:.4f})"
    )
    return 0


def _evaluate_arguments(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint with YouTube-8M's metrics and record it")
    p.add_argument("--checkpoint", metavar="URI")
    p.add_argument(
        "--data", default=None, metavar="URI", help="root of the Parquet layout (default: $VTAG_PARQUET_URI)"
    )
    p.add_argument("--split", default="validate")
    p.add_argument("--pattern", default="*.parquet")
    p.add_argument("--promote", action="store_true", help="promote to production if its GAP is at least production's")
    p.add_argument("--json", action="store_true", help="end with one JSON line: hit_at_one, perr, gap, map")
    p.add_argument(
        "--segments", action="store_true", help="segment mAP@N over the split's rated segments instead (frame level)"
    )
    p.add_argument(
        "--submission",
        metavar="URI",
        help="with --segments: score this segments.csv (a night's) instead of a checkpoint",
    )
    segment_method_arg(p, "model", "with --segments")
    p.add_argument("--top-n", type=int, default=100_000, metavar="N", help="with --segments: each class's best N")
    precision_arg(p, scoring=True)
    db_arg(p)
    p.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    import json

    from tasks.training import evaluate_model, evaluate_segments, evaluate_submission, promote

    if args.checkpoint is None and not (args.segments and args.submission):
        raise UsageError("give --checkpoint, or --segments with --submission")
    if args.checkpoint is not None and args.submission is not None:
        raise UsageError("give --checkpoint or --submission, not both")
    if args.segments:
        where, data = {"split": args.split, "pattern": args.pattern}, args.data or settings.default_parquet_uri()
        if args.submission:
            found = evaluate_submission(args.submission, data, args.top_n, **where)
            how = f"in {args.submission}"
        else:
            found = evaluate_segments(args.checkpoint, data, args.segment_method, args.top_n, **where)
            how = f"by the {found.method} method"
        print(
            f"segments of {args.split} {how}: mAP@{found.top_n} {found.map_at_n:.4f} "
            f"({found.segments_scored} segments ranked, {found.rated} rated)"
        )
        if args.json:
            print(json.dumps({"segment_map": found.map_at_n, "top_n": found.top_n, "method": found.method}))
        return 0
    result = evaluate_model(
        args.checkpoint,
        args.data or settings.default_parquet_uri(),
        args.db,
        split=args.split,
        pattern=args.pattern,
        precision=args.precision,
    )
    metrics = {k: result[k] for k in ("hit_at_one", "perr", "gap", "map")}
    print(
        f"model version {result['version']} on {args.split} ({result['videos']} videos): "
        + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    print(f"plot: {result['plot_uri']}")
    if args.promote:
        print(promote(args.db, result["version"], args.split)["reason"])
    if args.json:
        print(json.dumps(metrics))
    return 0


def _infer_arguments(sub) -> None:
    p = sub.add_parser("infer", help="score videos and write each one's top-k labels to the database")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="URI", help="score with this checkpoint")
    which.add_argument("--production", action="store_true", help="score with the production model")
    which.add_argument("--model-version", type=int, metavar="N", help="score with this registered version")
    p.add_argument("--level", choices=list(LEVELS), default="frame", help="with --production (default frame)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument(
        "--logical-date",
        type=iso_date,
        default=None,
        metavar="ISO",
        help="score what was ingested up to then (default: now)",
    )
    p.add_argument("--video", action="append", metavar="ID", help="(re)score this video (repeatable)")
    p.add_argument("--shard-pattern", metavar="GLOB", help="only videos from Parquet files matching this glob")
    p.add_argument("--dry-run", action="store_true", help="count what would be scored, write nothing")
    p.add_argument("--exports", metavar="URI", help="folder for the CSV and pickle exports")
    p.add_argument(
        "--part-videos",
        type=int,
        default=None,
        metavar="N",
        help="score the night in parts of about N videos (default 250000), as the DAG's mapped tasks do",
    )
    p.add_argument(
        "--segments",
        type=int,
        default=0,
        metavar="M",
        help="also keep each video's best M 5-second segments (frame level; default 0: none) and write segments.csv",
    )
    segment_method_arg(p, "attention", "with --segments")
    precision_arg(p, scoring=True)
    p.add_argument(
        "--lock-timeout",
        type=lock_timeout_arg,
        default=None,
        metavar="SECONDS",
        help="wait at most this long for another run of the same night (default $VTAG_LOCK_TIMEOUT_S or 600)",
    )
    db_arg(p)
    p.set_defaults(handler=_infer)


def _infer(args) -> int:
    from tasks.inference import run_inference

    when = args.logical_date or datetime.now(UTC)
    parts = {} if args.part_videos is None else {"part_videos": args.part_videos}
    report = run_inference(
        args.db,
        when,
        top_k=args.top_k,
        level=args.level,
        model_version=args.model_version,
        checkpoint_uri=args.checkpoint,
        video_ids=args.video,
        shard_pattern=args.shard_pattern,
        dry_run=args.dry_run,
        exports_uri=args.exports,
        progress=sys.stderr.isatty(),
        lock_timeout_s=args.lock_timeout,
        precision=args.precision,
        segments=args.segments,
        segment_method=args.segment_method,
        **parts,
    )
    if args.dry_run:
        print(f"dry run: model version {report.model_version} would score {report.videos} videos")
        return 0
    print(
        f"run {report.run_id}: model version {report.model_version} scored {report.videos} videos, "
        f"{report.rows_written} rows written"
    )
    for uri in report.exports:
        print(f"export: {uri}")
    return 0


def _retire_arguments(sub) -> None:
    p = sub.add_parser("retire", help="drop the predictions of old model versions (their runs stay as history)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model-version", type=int, metavar="N", action="append", help="retire this version (repeatable)"
    )
    which.add_argument("--keep", type=int, metavar="N", help="retire all but the newest N versions with predictions")
    db_arg(p)
    p.set_defaults(handler=_retire)


def _retire(args) -> int:
    from storage.database import db, partitions
    from tasks.inference import retire_old_versions

    if args.keep is not None:
        retired = retire_old_versions(args.db, args.keep)
        print(f"retired the predictions of model versions {', '.join(map(str, retired)) or '(none)'}")
        return 0
    for version in args.model_version:
        with db.transaction(args.db) as conn:
            dropped = partitions.retire(conn, version)
        print(f"model version {version}: {dropped} prediction rows dropped")
    return 0


def _merge_arguments(sub) -> None:
    p = sub.add_parser(
        "merge-nights",
        help="merge the later nights' layers of each model version's predictions into its base (PostgreSQL)",
    )
    p.add_argument(
        "--at-most",
        type=int,
        metavar="N",
        help="merge a version's layers when it has more than N (default: $VTAG_NIGHT_LAYERS or 7; 0: all now)",
    )
    db_arg(p)
    p.set_defaults(handler=_merge)


def _merge(args) -> int:
    from tasks.inference import merge_night_layers

    merged = merge_night_layers(args.db, args.at_most)
    for version, rows in merged.items():
        print(f"model version {version}: {rows} rows of its later nights merged into its base")
    if not merged:
        print("no model version has more later nights than that as layers of their own")
    return 0


def _query_arguments(sub) -> None:
    p = sub.add_parser("query", help="run a query from sql/queries and print a table")
    p.add_argument("name", nargs="?", help="query name; without it, list the queries")
    p.add_argument("params", nargs="*", metavar="NAME=VALUE")
    db_arg(p)
    p.set_defaults(handler=_query)


def _query(args) -> int:
    from tasks import queries

    if not args.name:
        for name in queries.available():
            header, params = queries.describe(name)
            print(f"{name}: {header}")
        return 0
    params = {}
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep:
            raise queries.QueryError(f"parameters are NAME=VALUE, not {item!r}")
        params[key] = value
    columns, rows = queries.run(args.db, args.name, params)
    _print_table([dict(zip(columns, row)) for row in rows], columns)
    return 0


def _vocabulary_arguments(sub) -> None:
    p = sub.add_parser("vocabulary", help="load the YouTube-8M label vocabulary (vocabulary.csv) into the database")
    p.add_argument("csv", metavar="URI", help="path or URI of vocabulary.csv")
    db_arg(p)
    p.set_defaults(handler=_vocabulary)


def _vocabulary(args) -> int:
    from storage.database import catalog, db

    with db.transaction(args.db) as conn:
        loaded = catalog.load_vocabulary(conn, args.csv)
    print(f"{loaded} labels loaded from {args.csv}")
    return 0


def _models_arguments(sub) -> None:
    p = sub.add_parser("models", help="list model versions with their latest evaluation")
    db_arg(p)
    p.set_defaults(handler=_models)


def _models(args) -> int:
    from storage.database import db, registry

    with db.transaction(args.db) as conn:
        rows = registry.versions_with_latest_evaluation(conn)
    for row in rows:
        for key in ("gap", "hit_at_one", "perr", "map"):
            row[key] = None if row[key] is None else f"{row[key]:.4f}"
    _print_table(
        rows,
        [
            "version",
            "level",
            "preset",
            "status",
            "epochs",
            "split",
            "videos",
            "gap",
            "hit_at_one",
            "perr",
            "map",
            "checkpoint_uri",
        ],
    )
    return 0


def _manifest_arguments(sub) -> None:
    p = sub.add_parser("manifest", help="show the ingest manifest")
    p.add_argument("--dest", default=None, metavar="URI", help="only shards ingested to this destination")
    db_arg(p)
    p.set_defaults(handler=_manifest)


def _manifest(args) -> int:
    from storage.database import db, manifest
    from storage.objectstore import canonical_uri

    with db.transaction(args.db) as conn:
        rows = manifest.rows(conn, canonical_uri(args.dest) if args.dest else None)
    _print_table(rows, ["source_uri", "status", "level", "split", "rows", "output_uri", "error"])
    return 0


def _db_arguments(sub) -> None:
    p = sub.add_parser("db", help="database schema migrations")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    for name, help_text in (
        ("upgrade", "migrate to the newest schema"),
        ("downgrade", "migrate down to REVISION"),
        ("current", "print the schema revision"),
    ):
        q = dbsub.add_parser(name, help=help_text)
        if name == "downgrade":
            q.add_argument("revision", help="target revision, e.g. base or -1")
        db_arg(q)
    p.set_defaults(handler=_db)


def _db(args) -> int:
    from storage.database import db

    if args.db_command == "upgrade":
        db.upgrade(args.db)
    elif args.db_command == "downgrade":
        db.downgrade(args.db, args.revision)
    print(db.current_revision(args.db) or "base")
    return 0


def _schema_on_entry(url: str) -> None:
    """The embedded SQLite under VTAG_HOME is the command line's own: migrated on entry, so that it needs no
    set-up. Any other database has a deploy step that migrates it (`vtag db upgrade`, the Airflow image's
    init): here it is only checked, so that an analyst's newer `vtag` never changes a schema under running
    workers. One line names the revision it is at and the way forward; nothing is changed."""
    from storage.database import db

    if settings.is_embedded_db(url):
        db.upgrade(url)
    else:
        db.require_current(url)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that get one clear line instead of a traceback: ours (VtagError: bad input, a missing or changed
    object, a refused request) and a database that cannot be reached. Anything else is a bug: its traceback
    stays, for the report."""
    from sqlalchemy.exc import OperationalError

    from storage.errors import VtagError

    return VtagError, OperationalError


COMMANDS = [
    _synth_arguments,
    _ingest_arguments,
    _train_arguments,
    _evaluate_arguments,
    _finetune_arguments,
    _infer_arguments,
    _retire_arguments,
    _merge_arguments,
    _query_arguments,
    _vocabulary_arguments,
    _models_arguments,
    _manifest_arguments,
    _db_arguments,
]  # each subcommand: its arguments, then its handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if hasattr(args, "db"):
        args.db = args.db or settings.default_db_url()
    try:
        if hasattr(args, "db") and args.command != "db" and os.environ.get("RANK", "0") == "0":
            _schema_on_entry(args.db)  # under torchrun, rank 0 alone talks to the database
        return args.handler(args)
    except _user_errors() as exc:
        if args.verbose:  # the whole story for a bug report; otherwise one line
            logging.getLogger("vtag").exception("vtag %s failed", args.command)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"vtag {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
