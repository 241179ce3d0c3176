"""A night's exports, written as they are scored: Google's CSV and the seed's pickle, in memory that
does not grow with the night.

Each part of a night writes two fragments while it scores (`parts/part-NNNNN.csv`, CSV rows without the
header; `parts/part-NNNNN.pickle-items`, the body of a pickled list); the night's end joins them, in part
order, into the two files people know:

- `predictions.csv`: `VideoId,LabelConfidencePairs`, the top 20 as "label score ..." (Google's
  inference.py format).
- `AttentionLSTM_infer_result`: one pickled list of `(video_id, [(label, score), ...])` with the top
  k, as the seed wrote it; `pickle.load` reads it as before. It is written incrementally: protocol 2,
  an empty list, then each chunk's items appended (MARK ... APPENDS), then STOP, which is what pickle writes
  for a list, less its memo entries (so the same list comes back).
"""

import csv
import io
import pickle
import shutil
from contextlib import ExitStack
from itertools import chain

import numpy as np

from storage.objectstore import S3Config, join, store_for

CSV_NAME, PICKLE_NAME = "predictions.csv", "AttentionLSTM_infer_result"
CSV_HEADER = "VideoId,LabelConfidencePairs\r\n"
CSV_TOP = 20  # Google's inference.py writes the top 20
_PICKLE_START, _PICKLE_STOP = b"\x80\x02]", b"."  # PROTO 2, EMPTY_LIST ... STOP
_COPY_BUFFER = 1 << 20


def night_folder(root: str, logical_date, model_version: int | None = None) -> str:
    """Where a night's exports go under `root`: `<root>/<logical date>` (the nightly DAG), or with
    `_v<model version>` after it (`vtag infer`'s default, beside other versions' nights)."""
    name = f"{logical_date:%Y-%m-%dT%H%M%S}" + (f"_v{model_version}" if model_version is not None else "")
    return join(root, name)


def fragment_uris(exports_uri: str, part: int) -> tuple[str, str]:
    return (
        join(exports_uri, "parts", f"part-{part:05d}.csv"),
        join(exports_uri, "parts", f"part-{part:05d}.pickle-items"),
    )


def _pickle_items(items: list) -> bytes:
    """The APPEND(S) opcodes that add `items` to a list already on the unpickler's stack."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True  # no memo: each chunk stands alone, and nothing is kept between chunks
    pickler.dump(items)
    return buffer.getvalue()[len(_PICKLE_START) : -len(_PICKLE_STOP)]


class PartExports:
    """One part's two fragments, published (atomically, only whole) when the part succeeds."""

    def __init__(self, exports_uri: str, part: int, top_k: int, s3: S3Config | None = None):
        self._uris, self._top_k, self._s3 = fragment_uris(exports_uri, part), top_k, s3
        self._stack = ExitStack()

    def __enter__(self):
        for uri in self._uris:  # a try of this part killed mid-write left its temporaries: this one replaces it
            store_for(uri, self._s3).remove_stale_temporaries(uri)
        csv_path, pickle_path = (self._stack.enter_context(store_for(u, self._s3).publish(u)) for u in self._uris)
        self._csv_file = self._stack.enter_context(open(csv_path, "w", newline=""))
        self._csv = csv.writer(self._csv_file)
        self._pickle = self._stack.enter_context(open(pickle_path, "wb"))
        return self

    def __exit__(self, *exc_info):
        return self._stack.__exit__(*exc_info)

    def add(self, ids: list[str], labels: np.ndarray, scores: np.ndarray) -> None:
        """A batch's videos, with their labels and scores in rank order (at least max(top_k, 20) each)."""
        # One % per video over Python lists: a third faster than formatting pair by pair (benchmarks.scale).
        top = min(CSV_TOP, labels.shape[1])
        label_rows, score_rows = labels.tolist(), scores.astype(np.float64).tolist()
        line = " ".join(["%d %g"] * top)
        self._csv.writerows(
            [video, line % tuple(chain.from_iterable(zip(ls[:top], s[:top])))]
            for video, ls, s in zip(ids, label_rows, score_rows)
        )
        k = self._top_k
        self._pickle.write(
            _pickle_items([(video, list(zip(ls[:k], s[:k]))) for video, ls, s in zip(ids, label_rows, score_rows)])
        )

    @property
    def uris(self) -> tuple[str, str]:
        return self._uris


def join_night(exports_uri: str, parts: list[int], s3: S3Config | None = None) -> list[str]:
    """Join the parts' fragments into the night's two files, streamed. The fragments stay (`parts/`,
    each part's own exports): a part run again later, then the join, gives the night's files anew."""
    fragments = [fragment_uris(exports_uri, part) for part in parts]
    out = []
    for name, index, head, tail in (
        (CSV_NAME, 0, CSV_HEADER.encode(), b""),
        (PICKLE_NAME, 1, _PICKLE_START, _PICKLE_STOP),
    ):
        uri = join(exports_uri, name)
        with store_for(uri, s3).publish(uri) as path, open(path, "wb") as target:
            target.write(head)
            for pair in fragments:
                source = pair[index]
                with store_for(source, s3).open_read(source) as f:
                    shutil.copyfileobj(f, target, _COPY_BUFFER)
            target.write(tail)
        out.append(uri)
    return out
