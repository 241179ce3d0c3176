"""A night's segment rows as they travel from the model to the database and the exports: per video its
best M (segment, class) pairs, best first, in numpy arrays (videos x M), and their columnar rows."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

COLUMNS = ("video_id", "model_version", "rank", "label_id", "start_second", "score", "run_id")


@dataclass(frozen=True)
class TopSegments:
    """Each video's best segments over the rated classes, best first (videos x M): the class, the second
    the segment starts at, its score, and whether the slot holds a segment (a video shorter than 5 frames
    has none; a video's segments fill its first slots)."""

    labels: np.ndarray
    starts: np.ndarray
    scores: np.ndarray
    present: np.ndarray

    def take(self, rows) -> "TopSegments":
        return TopSegments(self.labels[rows], self.starts[rows], self.scores[rows], self.present[rows])

    @classmethod
    def concat(cls, parts: list["TopSegments"]) -> "TopSegments":
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__))

    @property
    def rows(self) -> int:
        return int(self.present.sum())

    def table(self, ids: list[str], model_version: int, run_id: int) -> pa.Table:
        """The present slots as segment_predictions rows, columnar (no Python loop over rows)."""
        count, m = self.labels.shape
        keep = self.present.reshape(-1)
        n = int(keep.sum())
        return pa.table(
            {
                "video_id": pa.array(np.repeat(np.asarray(ids, dtype=object), m)[keep], pa.string()),
                "model_version": pa.array(np.full(n, model_version, np.int32)),
                "rank": pa.array(np.tile(np.arange(1, m + 1, dtype=np.int16), count)[keep]),
                "label_id": pa.array(self.labels.reshape(-1)[keep].astype(np.int32)),
                "start_second": pa.array(self.starts.reshape(-1)[keep].astype(np.int32)),
                "score": pa.array(self.scores.reshape(-1)[keep].astype(np.float64)),
                "run_id": pa.array(np.full(n, run_id, np.int32)),
            }
        )
