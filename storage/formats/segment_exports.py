"""The night's segment submission: `segments.csv` in the format of Google's starter (`inference.py
--segment_labels`, scored by `segment_eval_inference.py`): a header `Class,Segments`, then per segment-rated
class (in segment_label_ids.csv's order) its best segments as `video_id:start_second`, best first, space
separated, at most `top_n` (the 2019 challenge's 100,000); a class without any predicted segment has no line.

Each part gathers its videos' segment rows (bounded by the part's size, a few bytes a row) and writes, when
it succeeds, one fragment (`parts/part-NNNNN.segments.parquet`): its rows sorted by class and score, each
class cut to its best `top_n`, one row group per class. The night's end merges the fragments class by
class (`join_night`), holding one class's candidates from every part at a time, never the night.
"""

import re
from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import VtagError
from storage.formats.segment_rows import TopSegments
from storage.formats.yt8m_spec import SEGMENT_CLASSES
from storage.objectstore import S3Config, join, store_for

SUBMISSION_NAME = "segments.csv"
SUBMISSION_HEADER = "Class,Segments\n"
TOP_N = 100_000  # the 2019 challenge's cap: each class's best 100,000 segments count
_SEGMENT_ID = re.compile(r"[^\s:]+:\d+")
_ORDER = [("label_id", "ascending"), ("score", "descending"), ("video_id", "ascending"), ("start_second", "ascending")]


def fragment_uri(exports_uri: str, part: int) -> str:
    return join(exports_uri, "parts", f"part-{part:05d}.segments.parquet")


COMPACT_EVERY = 256  # batches


class PartSegments:
    """One part's segment fragment, gathered as the part scores and published (atomically) by `write`."""

    def __init__(self, exports_uri: str, part: int, top_n: int = TOP_N, s3: S3Config | None = None):
        self.uri, self.top_n, self.s3 = fragment_uri(exports_uri, part), top_n, s3
        self._tables: list[pa.Table] = []  # compacted, one per COMPACT_EVERY batches
        self._recent: list[pa.Table] = []

    def add(self, ids: list[str], top: TopSegments) -> None:
        rows = top.table(ids, 0, 0)
        self._recent.append(rows.select(["label_id", "score", "video_id", "start_second"]))
        if len(self._recent) >= COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        # A part over thousands of files gets batches of a few videos each (a night's new videos are spread
        # over every shard): kept as one small table a batch, they cost some 40 KB each whatever their rows
        # (measured: 12,000 batches of 1-10 videos, +500 MB), so they are merged into one as they come.
        if self._recent:
            self._tables.append(pa.concat_tables(self._recent).combine_chunks())
            self._recent = []

    def write(self) -> str:
        store = store_for(self.uri, self.s3)
        store.remove_stale_temporaries(self.uri)
        self._compact()
        rows = _sorted(pa.concat_tables(self._tables) if self._tables else _empty())
        self._tables = []
        with store.publish(self.uri) as path, pq.ParquetWriter(path, rows.schema) as writer:
            for label_rows in _by_class(rows):
                writer.write_table(label_rows.slice(0, self.top_n))
            if rows.num_rows == 0:
                writer.write_table(rows)
        return self.uri


def _empty() -> pa.Table:
    return pa.table(
        {"label_id": pa.array([], pa.int32()), "score": pa.array([], pa.float64()),
         "video_id": pa.array([], pa.string()), "start_second": pa.array([], pa.int32())}
    )  # fmt: skip


def _sorted(rows: pa.Table) -> pa.Table:
    return rows.take(pc.sort_indices(rows, sort_keys=_ORDER))


def _by_class(rows: pa.Table):
    """Slices of a table sorted by label_id, one per class."""
    labels = rows.column("label_id").to_numpy()
    if not len(labels):
        return
    edges = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist(), len(labels)]
    for start, stop in zip(edges, edges[1:]):
        yield rows.slice(start, stop - start)


def join_night(exports_uri: str, parts: list[int], top_n: int = TOP_N, s3: S3Config | None = None) -> str:
    """The night's `segments.csv` from its parts' fragments, merged class by class."""
    uri = join(exports_uri, SUBMISSION_NAME)
    with ExitStack() as stack:
        fragments = []
        for part in parts:
            source = fragment_uri(exports_uri, part)
            reader = pq.ParquetFile(stack.enter_context(store_for(source, s3).open_read(source)))
            groups = {}
            for i in range(reader.metadata.num_row_groups):
                group = reader.metadata.row_group(i)
                if group.num_rows:
                    groups[group.column(0).statistics.min] = i  # one class a row group
            fragments.append((reader, groups))
        with store_for(uri, s3).publish(uri) as path, open(path, "w", newline="") as out:
            out.write(SUBMISSION_HEADER)
            for label in SEGMENT_CLASSES:
                candidates = [r.read_row_group(g[label]) for r, g in fragments if label in g]
                if not candidates:
                    continue  # as the starter: a class no segment was predicted for has no line
                best = _sorted(pa.concat_tables(candidates)).slice(0, top_n)
                segments = " ".join(
                    f"{video}:{start}"
                    for video, start in zip(
                        best.column("video_id").to_pylist(), best.column("start_second").to_pylist()
                    )
                )
                out.write(f"{label},{segments}\n")
    return uri


class SubmissionError(VtagError, ValueError):
    pass


def read_submission(uri: str, s3: S3Config | None = None) -> dict[int, list[str]]:
    """A segment submission (`Class,Segments`, as written above or by the starter) as {class: [segment id,
    ...] best first}; SubmissionError naming the file and line of anything else."""
    submission: dict[int, list[str]] = {}
    with store_for(uri, s3).open_read(uri) as f:
        for number, raw in enumerate(f, start=1):  # bytes, line by line: a bad byte is named by its line
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise SubmissionError(f"{uri} line {number}: not UTF-8 text (is it a segments.csv?)") from None
            _read_line(uri, number, line, submission)
    return submission


def _read_line(uri: str, number: int, line: str, submission: dict[int, list[str]]) -> None:
    if number == 1:
        if line != SUBMISSION_HEADER.strip():
            raise SubmissionError(f"{uri}: line 1 is {line[:40]!r}, not the header {SUBMISSION_HEADER.strip()!r}")
        return
    label, comma, segments = line.partition(",")
    if not comma or not label.isdigit() or int(label) in submission:
        raise SubmissionError(f"{uri} line {number}: not 'class,video:start ...' of a class not seen before")
    ids = segments.split()
    if bad := next((i for i in ids if not _SEGMENT_ID.fullmatch(i)), None):
        raise SubmissionError(f"{uri} line {number}: {bad[:60]!r} is not a segment id (video_id:start_second)")
    submission[int(label)] = ids
