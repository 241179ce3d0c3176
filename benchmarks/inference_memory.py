"""Peak RSS and bytes read of a night with the default video model, from its inference artifact against
from its training checkpoint (issue 25: a part's peak RSS <= 1 GB, bytes read <= 1.1x the artifact).

    python -m benchmarks.inference_memory [--videos 4000] [--train-videos N] [--sources artifact,checkpoint]
                                          [--work DIR]

The product path end to end, each step a `vtag` subprocess on the embedded SQLite of a scratch VTAG_HOME:
synthetic video-level shards, `vtag ingest`, `vtag train --preset video` (the default video model: four
chained MLPs, about 85 M parameters, Adam; one short epoch on `--train-videos` of them, so that its
checkpoint holds a real optimizer state; the rest are test-split shards, scored only), `vtag evaluate --promote`, then `vtag infer --production` twice on the same videos (each at its own logical date, now, after the first night's rows are deleted, so both nights score every video; the benchmark fails if a night scores fewer): once as
registered (the artifact), once with the version's artifact columns emptied, as a version registered
before migration 0010 (the checkpoint). Peak RSS is the child's (wait4), bytes read its `/proc/self/io`
`rchar` (every read() it made: the model file, Parquet, Python's own imports) at exit. Memory-mapped
pages of the artifact come from the page cache and are not in `rchar`.
"""

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VTAG = [sys.executable, "-c", "import atexit, sys; from tasks.cli import main; atexit.register(lambda: print('io ' + open('/proc/self/io').read().replace(chr(10), ' '), file=sys.stderr)); sys.exit(main())"]  # fmt: skip


def _run(env: dict, *args) -> dict:
    """`vtag ARGS` as a child: its seconds, its own peak RSS (ru_maxrss of exactly this child, by wait4),
    the bytes it read (rchar, printed by the child at exit) and its stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([*VTAG, *map(str, args)], env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"vtag {' '.join(map(str, args))} failed: {stderr.strip()[-2000:]}")
    fields = stderr.rsplit("io ", 1)[-1].replace(": ", ":").split()
    io = {k: int(v) for k, v in (f.split(":") for f in fields if ":" in f and f.split(":")[1].isdigit())}
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "rchar": io.get("rchar", 0),
        "stdout": stdout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4000, help="videos scored each night")
    parser.add_argument("--train-videos", type=int, default=None, help="of those, trained on (default: all)")
    parser.add_argument("--sources", default="artifact,checkpoint", help="what the nights load the model from")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="vtag-inference-memory-"))
    env = {**os.environ, "VTAG_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("VTAG_DB_URL", None)
    raw, parquet, out = work / "raw", work / "parquet", work / "model"
    shards = max(1, args.videos // 1000)
    train_shards = max(1, min(shards - 1, (args.train_videos or args.videos) // 1000))
    print(f"benchmarks.inference_memory: {shards} x 1,000 video-level videos in {work}", flush=True)
    for split, count in (("train", train_shards), ("validate", 1), ("test", shards - train_shards - 1)):
        if count > 0:
            _run(env, "synth", "--out", raw, "--level", "video", "--split", split, "--shards", count, "--videos-per-shard", 1000)  # fmt: skip
    _run(env, "ingest", "--src", raw, "--dest", parquet)
    train = _run(env, "train", "--data", parquet, "--level", "video", "--preset", "video", "--epochs", 1, "--out", out)  # fmt: skip
    print(f"  vtag train --preset video, 1 epoch: {train['seconds']:.0f} s, peak RSS {train['peak_rss_mb']:,.0f} MB")
    final = max((p for p in out.glob("final-step*.pt") if not p.name.endswith(".weights.pt")), key=lambda p: p.name)
    _run(env, "evaluate", "--checkpoint", final, "--data", parquet, "--promote")
    db = work / "home" / "vtag.db"
    with sqlite3.connect(db) as conn:
        weights_uri, weights_sha256 = conn.execute(
            "SELECT weights_uri, weights_sha256 FROM model_versions WHERE status = 'production'"
        ).fetchone()
    sizes = {"checkpoint": final.stat().st_size, "artifact": Path(weights_uri).stat().st_size}
    print(f"  checkpoint {sizes['checkpoint'] / 1e6:,.0f} MB, inference artifact {sizes['artifact'] / 1e6:,.0f} MB")
    figures = {"sizes_bytes": sizes}
    for source in args.sources.split(","):
        if source == "checkpoint":
            with sqlite3.connect(db) as conn:  # as a version registered before migration 0010, its night again
                conn.execute("UPDATE model_versions SET weights_uri = NULL, weights_sha256 = NULL")
                conn.execute("DELETE FROM predictions")
                conn.execute("DELETE FROM inference_label_counts")
                conn.execute("DELETE FROM version_hits")
        # No logical date: now, after every video arrived (a fixed date before today would score none).
        night = _run(env, "infer", "--production", "--level", "video")
        scored = int(re.search(r"scored (\d+) videos", night["stdout"]).group(1))
        if scored != shards * 1000:
            raise SystemExit(
                f"the night from the {source} scored {scored} videos, not {shards * 1000}: {night['stdout']}"
            )
        model_bytes = sizes["artifact" if source == "artifact" else "checkpoint"]
        figures[source] = {k: night[k] for k in ("seconds", "peak_rss_mb", "rchar")} | {"videos": shards * 1000}
        print(
            f"  vtag infer from the {source}: {night['seconds']:.1f} s ({shards * 1000 / night['seconds']:,.0f} videos/s), peak RSS {night['peak_rss_mb']:,.0f} MB, "
            f"read {night['rchar'] / 1e6:,.0f} MB ({night['rchar'] / model_bytes:.2f}x the {source})"
        )
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE model_versions SET weights_sha256 = ?, weights_uri = ?", (weights_sha256, weights_uri))
    (work / "inference-memory.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
