"""Segment mAP@N (model/metrics.py `segment_map`) against the arithmetic of Google's
segment_eval_inference.py, reimplemented here step by step (its read_segment_predictions, its scored
ranks n/n .. 1/n, average_precision_calculator's ap_at_n with total positives, the mean over classes
with a positive), on a hand-made case and on random ones."""

import random

import numpy as np
import pytest

from model.metrics import segment_map


def _starter_segment_map(submission: dict[int, list[str]], labels: dict[tuple[str, int], float], top_n: int) -> float:
    positive_counter: dict[int, int] = {}
    for (_, label_id), v in labels.items():
        if v > 0:
            positive_counter[label_id] = positive_counter.get(label_id, 0) + 1
    seg_preds = {}
    for label_id, pred_ids in submission.items():  # read_segment_predictions
        if top_n:
            pred_ids = pred_ids[:top_n]
        seg_preds[label_id] = [p for p in pred_ids if (p, label_id) in labels]
    aps = []
    for label_id in sorted(seg_preds):
        class_preds = seg_preds[label_id]
        actuals = np.array([labels[(p, label_id)] for p in class_preds])
        predictions = np.array([float(x) / len(class_preds) for x in range(len(class_preds), 0, -1)])
        numpos = positive_counter.get(label_id, 0)
        if numpos == 0:  # MeanAveragePrecisionCalculator(filter_empty_classes=True) leaves it out
            continue
        if len(predictions) == 0:  # peek_ap_at_n of an empty heap
            aps.append(0.0)
            continue
        random.seed(0)  # ap_at_n shuffles before sorting (ties only; these scores have none)
        shuffled = random.sample(range(len(predictions)), len(predictions))
        predictions, actuals = predictions[shuffled], actuals[shuffled]
        order = sorted(range(len(predictions)), key=lambda k: predictions[k], reverse=True)
        ap, poscount = 0.0, 0.0
        for i in range(len(order)):
            if actuals[order[i]] > 0:
                poscount += 1
                ap += poscount / (i + 1) / numpos
        aps.append(ap)
    return float(np.mean(aps)) if aps else 0.0


def test_a_hand_made_case():
    labels = {
        ("v1:0", 3): 1.0,
        ("v1:5", 3): 0.0,
        ("v2:10", 3): 1.0,
        ("v3:0", 3): 1.0,  # never predicted: still counts among class 3's 3 positives
        ("v1:0", 7): 0.0,
        ("v2:0", 7): 1.0,
        ("v9:0", 8): 0.0,  # class 8: rated, no positive: left out of the mean
    }
    submission = {
        3: ["v1:0", "v4:0", "v1:5", "v2:10"],  # v4:0 is not rated for 3: dropped before ranking
        7: ["v1:0", "v2:0"],
        8: ["v9:0"],
    }
    # class 3, kept [v1:0 +, v1:5 -, v2:10 +]: (1/1 + 2/3) / 3; class 7, kept [v1:0 -, v2:0 +]: (1/2) / 1
    expected = ((1 + 2 / 3) / 3 + 1 / 2) / 2
    assert segment_map(submission, labels) == pytest.approx(expected)
    assert _starter_segment_map(submission, labels, top_n=0) == pytest.approx(expected)
    # capped at 2: class 3 keeps [v1:0 +] (v4:0, unrated, used one of its 2 places): 1/3; class 7 as before
    assert segment_map(submission, labels, top_n=2) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert _starter_segment_map(submission, labels, top_n=2) == pytest.approx((1 / 3 + 1 / 2) / 2)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("top_n", [0, 1, 5, 40])
def test_random_cases_equal_the_starters_arithmetic(seed, top_n):
    rng = np.random.default_rng(seed)
    segments = [f"v{v}:{5 * s}" for v in range(12) for s in range(6)]
    classes = [3, 7, 8, 11, 12]
    labels = {(seg, c): float(rng.random() < 0.4) for seg in segments for c in classes if rng.random() < 0.3}
    submission = {c: list(rng.permutation(segments)[: rng.integers(0, 30)]) for c in classes if rng.random() < 0.9}
    assert segment_map(submission, labels, top_n or None) == pytest.approx(
        _starter_segment_map(submission, labels, top_n), abs=1e-12
    )
