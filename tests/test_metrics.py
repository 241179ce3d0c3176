"""YouTube-8M metrics: hand-worked cases, a naive transcription of Google's loops, the accumulator."""

import numpy as np
import pytest

from model.metrics import MetricsAccumulator, yt8m_metrics

KEYS = ("hit_at_one", "perr", "gap", "map")

# 3 videos x 4 classes. Video 1 has no label; class 2 has no positive.
SCORES = np.array(
    [
        [0.9, 0.8, 0.1, 0.3],
        [0.2, 0.7, 0.6, 0.05],
        [0.0, 0.6, -0.3, -0.4],
    ]
)
LABELS = np.array(
    [
        [1, 0, 0, 1],
        [0, 0, 0, 0],
        [1, 1, 0, 0],
    ]
)


def test_hand_worked_top_2():
    # hit@1: argmax classes 0, 1, 1 -> labels 1, 0, 1 -> 2/3.
    # PERR: video 0, k=2: top classes 0 (0.9), 1 (0.8) -> one positive -> 1/2.
    #       video 1, k=0: counts 0.
    #       video 2, k=2: top classes 1 (0.6), 0 (0.0) -> both positive, but 0.0 is not > 0 -> 1/2.
    #       mean over all 3 videos: (1/2 + 0 + 1/2) / 3 = 1/3.
    # GAP, top 2 per video: v0 (c0 .9 +) (c1 .8 -); v1 (c1 .7 -) (c2 .6 -); v2 (c1 .6 +) (c0 .0 +).
    #   Ranked: .9+ .8- .7- .6-(v1) .6+(v2) .0+  (the tie at .6 keeps pooled order: v1 first).
    #   Positives at ranks 1, 5, 6: 1/1 + 2/5 + 3/6 = 1.9. Ground truth holds 4 positives
    #   (v0's class 3, scored 0.3, is third in its video and outside the top 2), so GAP = 1.9/4.
    # mAP: class 0: .9+ .0+ -> (1/1 + 2/2) / 2 positives = 1.
    #      class 1: .8- .7- .6+ -> (1/3) / 1 = 1/3.
    #      class 2: no positive, left out of the mean.
    #      class 3: its one positive fell outside the top 2 -> 0 / 1 = 0.
    #      mean over classes 0, 1, 3: (1 + 1/3 + 0) / 3 = 4/9.
    got = yt8m_metrics(SCORES, LABELS, top_k=2)
    assert got == pytest.approx({"hit_at_one": 2 / 3, "perr": 1 / 3, "gap": 0.475, "map": 4 / 9})


def test_hand_worked_top_k_larger_than_classes():
    # top_k=20 > C=4 keeps every triplet. Ranked pool:
    #   .9+ .8- .7- .6-(v1) .6+(v2) .3+ .2- .1- .05- .0+ -.3- -.4-
    #   Positives at ranks 1, 5, 6, 10: 1 + 2/5 + 3/6 + 4/10 = 2.3 -> GAP = 2.3/4.
    # mAP: class 0: .9+ .2- .0+ -> (1 + 2/3) / 2 = 5/6; class 1: 1/3 as above;
    #      class 3: .3+ .05- -.4- -> 1/1 = 1; mean = (5/6 + 1/3 + 1) / 3 = 13/18.
    # hit@1 and PERR do not depend on top_k.
    got = yt8m_metrics(SCORES, LABELS)
    assert got == pytest.approx({"hit_at_one": 2 / 3, "perr": 1 / 3, "gap": 0.575, "map": 13 / 18})


def test_ties_break_towards_lower_class_index():
    scores = np.array([[0.5, 0.5, 0.5]])
    # Three equal scores: the top 2 are classes 0 and 1, argmax is class 0, PERR's top 1 is class 0.
    assert yt8m_metrics(scores, np.array([[0, 0, 1]]), top_k=2) == pytest.approx(
        {"hit_at_one": 0.0, "perr": 0.0, "gap": 0.0, "map": 0.0}
    )
    # Class 1 is kept, second in the pool: GAP 1/2 at rank 2. Among class 1's own triplets it is
    # first: AP 1. PERR's top 1 is class 0, a negative.
    assert yt8m_metrics(scores, np.array([[0, 1, 0]]), top_k=2) == pytest.approx(
        {"hit_at_one": 0.0, "perr": 0.0, "gap": 0.5, "map": 1.0}
    )


def test_no_positive_anywhere_gives_zeros():
    got = yt8m_metrics(SCORES, np.zeros_like(LABELS))
    assert got == {"hit_at_one": 0.0, "perr": 0.0, "gap": 0.0, "map": 0.0}


def test_single_class():
    # C=1: every video's top 1 is its only class. Ranked: .8+ .4- .2+ -> (1 + 2/3) / 2.
    got = yt8m_metrics(np.array([[0.2], [0.8], [0.4]]), np.array([[1], [1], [0]]))
    assert got == pytest.approx({"hit_at_one": 2 / 3, "perr": 2 / 3, "gap": 5 / 6, "map": 5 / 6})


def test_perfect_scores_give_one():
    rng = np.random.default_rng(7)
    labels = _random_labels(rng, 300, 40, empty_fraction=0.0)
    # Every positive above every negative, in every video and across videos.
    scores = np.where(labels > 0, 0.6 + 0.4 * rng.random(labels.shape), 0.5 * rng.random(labels.shape))
    assert yt8m_metrics(scores, labels) == pytest.approx(dict.fromkeys(KEYS, 1.0))


def test_label_and_score_dtypes_agree():
    rng = np.random.default_rng(3)
    labels = _random_labels(rng, 60, 30)
    scores = rng.random(labels.shape)
    expected = yt8m_metrics(scores, labels)
    for s, truth in [
        (scores, labels.astype(bool)),
        (scores, labels.astype(np.float32)),
        (scores.astype(np.float32).astype(np.float64), labels.astype(np.uint8)),
    ]:
        assert yt8m_metrics(s, truth) == pytest.approx(expected, rel=0, abs=1e-12)
    assert yt8m_metrics(scores.tolist(), labels.tolist()) == pytest.approx(expected, rel=0, abs=1e-12)


# A naive transcription of Google's eval_util.py / average_precision_calculator.py loops, in plain
# Python over lists, without the random shuffle (stable sorts instead).


def naive_hit_at_one(scores, labels):
    total = 0.0
    for row, row_labels in zip(scores, labels):
        best = 0
        for j in range(len(row)):
            if row[j] > row[best]:
                best = j
        total += row_labels[best]
    return total / len(scores)


def naive_perr(scores, labels):
    aggregated = 0.0
    for row, row_labels in zip(scores, labels):
        num_labels = int(sum(row_labels))
        ascending = sorted(range(len(row)), key=lambda j: row[j])
        top_indices = ascending[-num_labels:]  # as argpartition(row, -k)[-k:]: all classes when k = 0
        item_precision = 0.0
        for j in top_indices:
            if row[j] > 0:
                item_precision += row_labels[j]
        aggregated += item_precision / len(top_indices)
    return aggregated / len(scores)


def naive_top_k_by_class(scores, labels, k):
    num_classes = len(scores[0])
    k = min(k, num_classes)
    out_predictions = [[] for _ in range(num_classes)]
    out_labels = [[] for _ in range(num_classes)]
    for row, row_labels in zip(scores, labels):
        top = sorted(range(num_classes), key=lambda j: row[j], reverse=True)[:k]
        for j in top:
            out_predictions[j].append(row[j])
            out_labels[j].append(row_labels[j])
    true_positives = [sum(row_labels[j] for row_labels in labels) for j in range(num_classes)]
    return out_predictions, out_labels, true_positives


def naive_ap_at_n(predictions, actuals, total_num_positives):
    sortidx = sorted(range(len(predictions)), key=lambda i: predictions[i], reverse=True)
    if total_num_positives == 0:
        return 0
    delta_recall = 1.0 / total_num_positives
    ap = 0.0
    poscount = 0.0
    for i in range(len(sortidx)):
        if actuals[sortidx[i]] > 0:
            poscount += 1
            ap += poscount / (i + 1) * delta_recall
    return ap


def naive_metrics(scores, labels, top_k=20):
    scores, labels = scores.tolist(), labels.tolist()
    predictions, actuals, positives = naive_top_k_by_class(scores, labels, top_k)
    flat_predictions = [p for sub in predictions for p in sub]
    flat_actuals = [a for sub in actuals for a in sub]
    aps = [naive_ap_at_n(predictions[c], actuals[c], positives[c]) for c in range(len(positives)) if positives[c] > 0]
    return {
        "hit_at_one": naive_hit_at_one(scores, labels),
        "perr": naive_perr(scores, labels),
        "gap": naive_ap_at_n(flat_predictions, flat_actuals, sum(positives)),
        "map": sum(aps) / len(aps) if aps else 0.0,
    }


def _random_labels(rng, n, c, empty_fraction=0.1):
    """1 to 7 positives per video (fewer if C is smaller), none for about empty_fraction of them."""
    labels = np.zeros((n, c), dtype=np.int64)
    for row in labels:
        if rng.random() >= empty_fraction:
            row[rng.choice(c, size=min(c, rng.integers(1, 8)), replace=False)] = 1
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n, c", [(200, 50), (50, 3862)])
def test_matches_naive_google_transcription(seed, n, c):
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, n, c)
    # Continuous (no ties); the per-video offsets mix videos in the pooled ranking and push some
    # videos' top scores to <= 0, where PERR stops counting positives.
    scores = rng.normal(size=(n, c)) + rng.uniform(-5, 1, size=(n, 1))
    assert labels.sum(axis=1).min() == 0  # some videos have no labels
    assert yt8m_metrics(scores, labels) == pytest.approx(naive_metrics(scores, labels), rel=0, abs=1e-9)


def test_each_classs_average_precision_is_googles_and_their_mean_is_map():
    rng = np.random.default_rng(7)
    labels = _random_labels(rng, 150, 40)
    labels[:, 3] = 0  # a class without a positive: no AP, left out of mAP
    scores = rng.normal(size=labels.shape)
    accumulator = MetricsAccumulator(40)
    accumulator.add(scores, labels)
    metrics, class_ap, positives = accumulator.result_by_class()
    predictions, actuals, naive_positives = naive_top_k_by_class(scores.tolist(), labels.tolist(), 20)
    assert positives.tolist() == naive_positives and np.isnan(class_ap[3])
    for c in range(40):
        if positives[c]:
            assert class_ap[c] == pytest.approx(naive_ap_at_n(predictions[c], actuals[c], positives[c]), abs=1e-12)
    assert (
        metrics["map"]
        == pytest.approx(np.nanmean(class_ap), abs=1e-12)
        == pytest.approx(naive_metrics(scores, labels)["map"], abs=1e-9)
    )


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_matches_naive_for_other_top_k(top_k):
    rng = np.random.default_rng(10 + top_k)
    labels = _random_labels(rng, 120, 12)
    scores = rng.random(labels.shape)
    assert yt8m_metrics(scores, labels, top_k=top_k) == pytest.approx(
        naive_metrics(scores, labels, top_k), rel=0, abs=1e-9
    )


def _batches(scores, labels, sizes):
    start = 0
    for size in sizes:
        yield scores[start : start + size], labels[start : start + size]
        start += size
    assert start == len(scores)


def test_accumulator_over_uneven_batches_matches_one_shot():
    rng = np.random.default_rng(5)
    labels = _random_labels(rng, 200, 50)
    scores = rng.random(labels.shape)
    accumulator = MetricsAccumulator(50, top_k=20)
    for batch_scores, batch_labels in _batches(scores, labels, [7, 1, 33, 59, 100]):
        accumulator.add(batch_scores, batch_labels)
    assert accumulator.num_videos == 200
    assert accumulator.result() == pytest.approx(yt8m_metrics(scores, labels), rel=0, abs=1e-12)


def test_accumulator_keeps_top_k_per_video_not_n_by_c():
    rng = np.random.default_rng(6)
    labels = _random_labels(rng, 90, 300)
    scores = rng.random(labels.shape)
    accumulator = MetricsAccumulator(300, top_k=20)
    for batch_scores, batch_labels in _batches(scores, labels, [40, 50]):
        accumulator.add(batch_scores, batch_labels)
    for stored in (accumulator._top_classes, accumulator._top_scores, accumulator._top_positives):
        assert np.concatenate(stored).shape == (90, 20)
    assert accumulator._class_positives.shape == (300,)

    # Fewer classes than top_k: every class is kept.
    small = MetricsAccumulator(4, top_k=20)
    small.add(SCORES, LABELS)
    assert np.concatenate(small._top_scores).shape == (3, 4)


def test_chunking_large_batches_changes_nothing():
    rng = np.random.default_rng(8)
    labels = _random_labels(rng, 150, 25)
    scores = rng.random(labels.shape)
    expected = naive_metrics(scores, labels)
    assert yt8m_metrics(scores, labels, chunk_rows=16) == pytest.approx(expected, rel=0, abs=1e-9)


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        (np.zeros(4), np.zeros(4), "2-D"),
        (np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((2, 4)), np.zeros((2, 5)), "differ in shape"),
        (np.zeros((0, 4)), np.zeros((0, 4)), "no videos"),
        (np.zeros((2, 0)), np.zeros((2, 0)), "no classes"),
        (np.array([[0.1, np.nan]]), np.array([[1, 0]]), "NaN"),
        (np.zeros((1, 2)), np.array([["a", "b"]]), "numeric"),
    ],
)
def test_invalid_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        yt8m_metrics(scores, labels)


def test_invalid_accumulator_use():
    with pytest.raises(ValueError, match="top_k"):
        yt8m_metrics(SCORES, LABELS, top_k=0)
    with pytest.raises(ValueError, match="num_classes"):
        MetricsAccumulator(0)
    accumulator = MetricsAccumulator(4)
    with pytest.raises(ValueError, match="no videos"):
        accumulator.result()
    with pytest.raises(ValueError, match="expected 4 classes"):
        accumulator.add(np.zeros((2, 5)), np.zeros((2, 5)))
    # A rejected batch leaves the accumulator as it was.
    accumulator.add(SCORES, LABELS)
    bad = SCORES.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        accumulator.add(bad, LABELS)
    assert accumulator.num_videos == 3
    assert accumulator.result() == yt8m_metrics(SCORES, LABELS)
