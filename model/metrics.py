"""YouTube-8M evaluation metrics: Hit@1, PERR, GAP@top_k and mAP.

They follow Google's starter code (google/youtube-8m: ``eval_util.py``,
``average_precision_calculator.py``, ``mean_average_precision_calculator.py``) so that our
figures can stand beside the published ones. All four are taken over the whole evaluation set,
never averaged over batches; `MetricsAccumulator` gets there batch by batch while keeping only
each video's top_k predictions, O(N * top_k + C) memory instead of N x C.

One deliberate difference: before sorting by score, Google shuffles the pooled predictions
(``random.seed(0)``), so tied scores land in an order that depends on the whole pool. We want the
same inputs to give the same figures everywhere, so every ranking here is a stable sort: tied
scores keep pooled order (video order, then each video's own ranking), and within a video tied
scores rank by ascending class index. With tie-free scores both give identical numbers.

Labels are multi-hot; as in Google's average-precision code, an entry > 0 counts as positive.
"""

import operator

import numpy as np

from storage.formats.yt8m_spec import TOP_K

__all__ = ["MetricsAccumulator", "segment_map", "yt8m_metrics"]

# Rows summarised at once: bounds the N x C temporaries (a sorted copy, a few masks) however
# large the batch handed to add() or yt8m_metrics() is.
CHUNK_ROWS = 1024


def yt8m_metrics(scores, labels, top_k=TOP_K, chunk_rows=CHUNK_ROWS):
    """Hit@1, PERR, GAP@top_k and mAP of N x C `scores` against multi-hot N x C `labels`.

    Returns a dict with float values under ``hit_at_one``, ``perr``, ``gap`` and ``map``.
    Raises ValueError when the arrays are not 2-D, differ in shape, hold no video or scores hold NaN.
    """
    num_classes = _check_batch(scores, labels, None)[0].shape[1]
    accumulator = MetricsAccumulator(num_classes, top_k, chunk_rows)
    accumulator.add(scores, labels)
    return accumulator.result()


class MetricsAccumulator:
    """Collects batches and gives `yt8m_metrics` of their concatenation.

    Hit@1 and PERR are per-video means, so running sums suffice. GAP and mAP rank predictions
    across videos, so each video's top_k (class, score, is_positive) triplets are kept, and each
    class's count of positives, since recall is measured against every positive in the ground
    truth, also those no top_k list caught.
    """

    def __init__(self, num_classes, top_k=TOP_K, chunk_rows=CHUNK_ROWS):
        self.num_classes = _positive_int("num_classes", num_classes)
        self.top_k = _positive_int("top_k", top_k)
        self.chunk_rows = _positive_int("chunk_rows", chunk_rows)
        self._hits = 0
        self._perr_sum = 0.0
        self._class_positives = np.zeros(self.num_classes, dtype=np.int64)
        # One (n, min(top_k, C)) array per chunk, rows in order of arrival.
        self._top_classes = []
        self._top_scores = []
        self._top_positives = []

    @property
    def num_videos(self):
        """Videos added so far."""
        return sum(len(chunk) for chunk in self._top_classes)

    def add(self, scores, labels):
        """Add one batch: N x C scores and multi-hot N x C labels, N >= 1."""
        scores, labels = _check_batch(scores, labels, self.num_classes)
        # Summarise every chunk before storing any, so a rejected batch leaves no trace.
        parts = [
            self._summarise(scores[start : start + self.chunk_rows], labels[start : start + self.chunk_rows])
            for start in range(0, len(scores), self.chunk_rows)
        ]
        for hits, perr_sum, class_positives, classes, top_scores, top_positives in parts:
            self._hits += hits
            self._perr_sum += perr_sum
            self._class_positives += class_positives
            self._top_classes.append(classes)
            self._top_scores.append(top_scores)
            self._top_positives.append(top_positives)

    def result(self):
        """The four metrics over every video added; ValueError if none was."""
        return self.result_by_class()[0]

    def result_by_class(self):
        """(the four metrics, each class's average precision, each class's positives): a class without a
        positive has NaN for its AP and is left out of mAP."""
        n = self.num_videos
        if n == 0:
            raise ValueError("no videos accumulated: call add() before result()")
        gap, class_ap = _pooled_average_precisions(
            np.concatenate(self._top_classes).ravel(),
            np.concatenate(self._top_scores).ravel(),
            np.concatenate(self._top_positives).ravel(),
            self._class_positives,
        )
        has_positive = ~np.isnan(class_ap)
        mean_ap = float(class_ap[has_positive].mean()) if has_positive.any() else 0.0
        metrics = {"hit_at_one": self._hits / n, "perr": self._perr_sum / n, "gap": gap, "map": mean_ap}
        return metrics, class_ap, self._class_positives.copy()

    def _summarise(self, scores, labels):
        scores = scores.astype(np.float64)
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        positives = labels > 0
        n, c = scores.shape

        # argmax takes the first of equal maxima, as Google's numpy.argmax does.
        hits = int(positives[np.arange(n), scores.argmax(axis=1)].sum())

        num_labels = positives.sum(axis=1)
        # Google takes argpartition(row, -k)[-k:], which for k = 0 is every class: a video without
        # labels scores 0 / C = 0. Dividing by max(k, 1) gives that same 0 without the special case.
        k = np.maximum(num_labels, 1)
        top_k = min(self.top_k, c)
        # Thresholds need only each row's m largest scores; sorting just those is far cheaper
        # than sorting all C.
        m = max(top_k, int(k.max()))
        descending = np.sort(np.partition(scores, c - m, axis=1)[:, c - m :], axis=1)[:, ::-1]
        found = (_highest(scores, descending, k) & positives & (scores > 0)).sum(axis=1)
        perr_sum = float((found / k).sum())

        kept = _highest(scores, descending, np.full(n, top_k))
        classes = np.nonzero(kept)[1].reshape(n, top_k)  # ascending class index in each row
        top_scores = np.take_along_axis(scores, classes, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        classes = np.take_along_axis(classes, order, axis=1)
        return (
            hits,
            perr_sum,
            positives.sum(axis=0),
            # int32 holds any class index and halves what the accumulator keeps per video.
            classes.astype(np.int32),
            np.take_along_axis(top_scores, order, axis=1),
            np.take_along_axis(positives, classes, axis=1),
        )


def _highest(scores, descending, k):
    """Mask of each row's k[i] highest scores (k[i] >= 1); ties go to the lower class index.

    `descending` holds at least each row's k[i] largest scores, largest first.

    That is the cut a stable sort by descending score would make, found with a few O(C) passes
    over the row instead of sorting its indices, which is several times slower.
    """
    kth = np.take_along_axis(descending, (k - 1)[:, None], axis=1)
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(axis=1)  # how many of the tied scores still fit
    return above | (tied & (np.cumsum(tied, axis=1) <= room[:, None]))


def _pooled_average_precisions(classes, scores, positives, class_positives):
    """GAP and each class's AP (NaN for a class without a positive) of the pooled top_k triplets.

    Average precision is the sum, over ranked positions i holding a positive, of the positives
    seen up to i divided by i; the sum is divided by all positives in the ground truth.
    mAP averages over the classes that have a positive, as Google's starter code does at HEAD.
    """
    order = np.argsort(-scores, kind="stable")
    classes, positives = classes[order], positives[order]
    total = int(class_positives.sum())
    seen = np.cumsum(positives)
    rank = np.arange(1, len(positives) + 1)
    gap = float((seen / rank)[positives].sum() / total) if total else 0.0

    # A stable regrouping by class keeps each class's triplets in the ranking above.
    by_class = np.argsort(classes, kind="stable")
    classes, positives = classes[by_class], positives[by_class]
    start = np.searchsorted(classes, classes)  # where each triplet's class group begins
    seen = np.cumsum(positives)
    seen_in_class = seen - (seen[start] - positives[start])
    rank_in_class = np.arange(len(classes)) - start + 1
    precision_sums = np.bincount(
        classes[positives], weights=(seen_in_class / rank_in_class)[positives], minlength=len(class_positives)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        class_ap = np.where(class_positives > 0, precision_sums / class_positives, np.nan)
    return gap, class_ap


def _check_batch(scores, labels, num_classes):
    scores, labels = np.asarray(scores), np.asarray(labels)
    for name, array in (("scores", scores), ("labels", labels)):
        if array.ndim != 2:
            raise ValueError(f"{name} must be a 2-D N x C array, got shape {array.shape}")
        if array.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric or boolean, got dtype {array.dtype}")
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in shape: {scores.shape} vs {labels.shape}")
    if scores.shape[0] == 0:
        raise ValueError("scores and labels hold no videos (N = 0)")
    if scores.shape[1] == 0:
        raise ValueError("scores and labels hold no classes (C = 0)")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes, got {scores.shape[1]}")
    return scores, labels


def _positive_int(name, value):
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def segment_map(ranked: dict[int, list[str]], ratings: dict[tuple[str, int], float], top_n: int | None = None) -> float:
    """Segment mAP@N, as Google's ``segment_eval_inference.py`` computes it from a segment submission.

    `ranked`: per class, its predicted segments best first, each "video_id:start_second" (the submission's
    `Class,Segments` rows); `ratings`: {(segment, class): score} of the rated segments, 1 positive, 0 not.
    Each class's list is cut to its first `top_n` (None: all), then keeps only the segments rated for that
    class; its average precision sums, over the positions i of that list holding a positive, the positives
    up to i divided by i, and divides by all of the class's positive ratings (found or not). The mean is over
    the submission's classes that have a positive rating.
    """
    positives: dict[int, int] = {}
    for (_, label), score in ratings.items():
        if score > 0:
            positives[label] = positives.get(label, 0) + 1
    precisions = []
    for label, segments in ranked.items():
        if not positives.get(label):
            continue  # no positive to find: left out of the mean
        kept = [ratings[(s, label)] > 0 for s in segments[:top_n] if (s, label) in ratings]
        hits = np.cumsum(kept)
        precisions.append(float((hits / np.arange(1, len(kept) + 1))[np.asarray(kept, bool)].sum()) / positives[label])
    return float(np.mean(precisions)) if precisions else 0.0
