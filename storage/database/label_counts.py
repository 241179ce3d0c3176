"""Counts kept while a night writes, so that reports over a night or a whole version read a few thousand
rows instead of scanning 122 M predictions.

Per part (`inference_label_counts`): at each rank, how many videos got each label (`videos`), how many
of those had ground truth when they were scored (`judged`) and how many of these it was true for (`hits`).
Per version (`version_hits`): the same judged and hits at each rank over the rows the version serves,
kept in step with them: a night adds its parts' counts when it publishes, and every delete of served rows
(a rescoring replacing them, a shard whose content changed) takes theirs off, from the rows' own `hit`,
so the totals stay exact whatever the ground truth became since. `sql/queries/precision_at_k.sql`
reads them.
"""

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Connection, case, delete, func, insert, select, update

from storage.database.schema import inference_label_counts, predictions, version_hits


@dataclass
class LabelCounts:
    """A part's counts as it writes, each a top_k x classes array."""

    top_k: int
    classes: int
    videos: np.ndarray = field(init=False)
    judged: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)

    def __post_init__(self):
        self.videos, self.judged, self.hits = (np.zeros((self.top_k, self.classes), np.int64) for _ in range(3))

    def add(self, top_labels: np.ndarray, hit: np.ndarray | None) -> None:
        """A chunk's videos: their labels by rank (videos x k) and whether each was true (a masked array,
        masked where the video had no ground truth; None when nothing was judged)."""
        for rank in range(self.top_k):
            labels = top_labels[:, rank]
            self.videos[rank] += np.bincount(labels, minlength=self.classes)
            if hit is None:
                continue
            judged = ~np.ma.getmaskarray(hit[:, rank])
            self.judged[rank] += np.bincount(labels[judged], minlength=self.classes)
            self.hits[rank] += np.bincount(labels[judged & np.ma.filled(hit[:, rank], False)], minlength=self.classes)

    def rows(self, run_id: int, part: int) -> list[dict]:
        ranks, label_ids = np.nonzero(self.videos)
        return [
            {
                "run_id": run_id,
                "part": part,
                "rank": int(r) + 1,
                "label_id": int(label),
                "videos": int(self.videos[r, label]),
                "judged": int(self.judged[r, label]),
                "hits": int(self.hits[r, label]),
            }
            for r, label in zip(ranks, label_ids)
        ]


def store(conn: Connection, counts: LabelCounts, run_id: int, part: int) -> None:
    rows = counts.rows(run_id, part)
    for start in range(0, len(rows), 20000):
        conn.execute(insert(inference_label_counts), rows[start : start + 20000])


def judged_and_hits(hit_column):
    """(judged, hits) aggregates over rows' `hit` (NULL: no ground truth when scored)."""
    return func.count(hit_column), func.coalesce(func.sum(case((hit_column, 1), else_=0)), 0)


def add_to_version(conn: Connection, model_version: int, by_rank) -> None:
    """Add (rank, judged, hits) rows (negative to take off) to the version's totals."""
    totals = version_hits.c
    for rank, judged, hits in by_rank:
        if not judged:
            continue
        changed = conn.execute(
            update(version_hits)
            .where(totals.model_version == model_version, totals.rank == rank)
            .values(judged=totals.judged + judged, hits=totals.hits + hits)
        )
        if changed.rowcount == 0:
            conn.execute(insert(version_hits).values(model_version=model_version, rank=rank, judged=judged, hits=hits))


def publish_parts(conn: Connection, run_id: int, model_version: int, parts: list[int]) -> None:
    """The published parts' counts join the version's totals (after their left-out videos left them)."""
    counts = inference_label_counts.c
    by_rank = conn.execute(
        select(counts.rank, func.sum(counts.judged), func.sum(counts.hits))
        .where(counts.run_id == run_id, counts.part.in_(parts))
        .group_by(counts.rank)
    ).all()
    add_to_version(conn, model_version, [(r, int(j or 0), int(h or 0)) for r, j, h in by_rank])


def take_off(conn: Connection, condition) -> None:
    """Served rows about to be deleted (those `condition` selects in `predictions`) leave their versions'
    totals; call it in the deleting transaction, before the delete."""
    stored = predictions.c
    judged, hits = judged_and_hits(stored.hit)
    by_version: dict[int, list] = {}
    for version, rank, j, h in conn.execute(
        select(stored.model_version, stored.rank, judged, hits)
        .where(condition)
        .group_by(stored.model_version, stored.rank)
    ):
        by_version.setdefault(version, []).append((rank, -int(j), -int(h)))
    for version, by_rank in by_version.items():
        add_to_version(conn, version, by_rank)


def forget_version(conn: Connection, model_version: int) -> None:
    conn.execute(delete(version_hits).where(version_hits.c.model_version == model_version))
