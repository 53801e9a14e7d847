"""Metrics: length mismatches give clear errors; TAT-QA rules on hand-checked dev cases; the seeded bootstrap; per-label
scores and the confusion matrix on a hand-made case, against scikit-learn."""
import json

import numpy as np
import pytest

from vrnx_nb.tasks import load_task, data_dir
from vrnx_nb.metrics import (bootstrap_ci, classification_metrics, rouge_metrics, task_metrics, tatqa_em_f1,
                             parse_tatqa_answer)


@pytest.fixture(scope="module")
def legal(): return load_task("legal")


@pytest.fixture(scope="module")
def finance(): return load_task("finance")


# --- bad input -------------------------------------------------------------------------------------------------------

def test_predictions_references_length_mismatch(legal):
    with pytest.raises(ValueError, match="2 predictions, 3 references"):
        classification_metrics(["Other", "Other"], ["Other", "Other", "Arbitration"], legal.labels)
    with pytest.raises(ValueError, match="1 predictions, 2 references"):
        rouge_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="differ in length"):
        task_metrics(legal, ["Other"] * 3, legal.test[:2])
    with pytest.raises(ValueError, match="empty"):
        rouge_metrics([], [])


# --- metrics ---------------------------------------------------------------------------------------------------------

def _dev_question(uid_prefix):
    for ctx in json.loads((data_dir()/"tatqa_dev.json").read_text()):
        for q in ctx["questions"]:
            if q["uid"].startswith(uid_prefix): return q
    raise KeyError(uid_prefix)


# (uid prefix, prediction, expected (EM, F1)), checked by hand against the rules of TAT-QA's tatqa_metric.py
TATQA_CASES = [
    ("4960801d", "$1,496.5 million", (1.0, 1.0)),   # span, scale million
    ("4960801d", "1496.5 million", (1.0, 1.0)),     # $ and comma dropped
    ("4960801d", "$1,496.5", (0.0, 0.0)),           # missing scale: 1496.5 != 1496500000
    ("4960801d", "$1,496.5 billion", (0.0, 0.0)),   # wrong scale
    ("eb787966", "-12.6 million", (1.0, 1.0)),      # arithmetic
    ("eb787966", "(12.6) million", (1.0, 1.0)),     # bracket = negative
    ("eb787966", "12.6 million", (0.0, 0.0)),       # sign matters; arithmetic F1 = EM
    ("05b670d3", "-22.22%", (1.0, 1.0)),            # percent scale
    ("05b670d3", "-0.2222", (1.0, 1.0)),            # plain value of a percentage
    ("05b670d3", "-22.2%", (0.0, 0.0)),
    ("593c4388", "time-and-material type | cost-plus type | fixed-price type", (1.0, 1.0)),  # any order
    ("593c4388", "fixed-price type | cost-plus type", (0.0, 0.86)),  # 3 of 4 words: P=1, R=.75
    ("c3993366", "57,768 | 73,260 thousand", (1.0, 1.0)),  # multi-span with scale
    ("f4142349", "2019", (1.0, 1.0)),
    ("f4142349", "The year 2019.", (0.0, 0.0)),      # text, not a number: '2019' is not normalised to '2019.0', no overlap
]


@pytest.mark.parametrize("uid,pred,expected", TATQA_CASES)
def test_tatqa_hand_checked(uid, pred, expected):
    q = _dev_question(uid)
    assert tatqa_em_f1(pred, q["answer"], q["answer_type"], q["scale"]) == expected


def test_tatqa_every_dev_target_matches_its_gold(finance):
    res = task_metrics(finance, [e.target for e in finance.examples], finance.examples, n_boot=10)
    assert res["metrics"] == {"exact_match": 1.0, "f1": 1.0}
    shuffled = [finance.examples[(i + 1) % len(finance.examples)].target for i in range(len(finance.examples))]
    assert task_metrics(finance, shuffled, finance.examples, n_boot=10)["metrics"]["exact_match"] < 0.05


def test_parse_answer():
    assert parse_tatqa_answer("Answer: 5 | 6 million\nmore text") == (["5", "6"], "million")
    assert parse_tatqa_answer("13.2%") == (["13.2%"], "percent")
    assert parse_tatqa_answer("") == ([], "")


def test_bootstrap_seeded_and_sensible():
    x = np.r_[np.ones(30), np.zeros(20)]
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    lo, hi = bootstrap_ci(x, n_boot=2000)
    assert lo < 0.6 < hi and 0.1 < hi - lo < 0.4   # binomial: ~ +-1.96*sqrt(.24/50) = +-0.136
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


# --- per-label scores, confusion matrix, collapse warning ------------------------------------------------------------

HAND_LABELS = ["Other", "Arbitration", "Choice of law", "Limitation of liability"]
HAND_REFS = ["Other", "Other", "Other", "Other", "Arbitration", "Arbitration", "Choice of law", "Choice of law"]
HAND_PREDS = ["Other", "Other", "Arbitration", None, "Arbitration", "Other", "Choice of law", "Other"]


def test_per_label_scores_on_a_hand_made_example():
    "By hand: Other 2 of 4 right and predicted 4 times; Arbitration 1 of 2, predicted 2; Choice of law 1 of 2, predicted 1."
    m = classification_metrics(HAND_PREDS, HAND_REFS, HAND_LABELS, n_boot=10)
    per = m["per_label"]
    assert list(per) == HAND_LABELS and m["labels"] == HAND_LABELS
    assert per["Other"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4, "predicted": 4}
    assert per["Arbitration"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert per["Choice of law"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2/3), "support": 2, "predicted": 1}
    assert per["Limitation of liability"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    from sklearn.metrics import precision_recall_fscore_support
    seen = HAND_LABELS[:3]
    p, r, f, n = precision_recall_fscore_support(HAND_REFS, [x or "<none>" for x in HAND_PREDS], labels=seen,
                                                 zero_division=0)
    np.testing.assert_allclose([[per[l][k] for l in seen] for k in ("precision", "recall", "f1")], [p, r, f])
    assert [per[l]["support"] for l in seen] == n.tolist()
    assert m["metrics"]["macro_f1"] == pytest.approx(np.mean(f))  # macro-F1 = mean per-label F1 over the labels that occur


def test_confusion_matrix_shape_and_values():
    m = classification_metrics(HAND_PREDS, HAND_REFS, HAND_LABELS, n_boot=10)
    assert m["confusion"] == [[2, 1, 0, 0, 1],  # Other: 2 right, 1 as Arbitration, 1 unmatched (last column)
                              [1, 1, 0, 0, 0],
                              [1, 0, 1, 0, 0],
                              [0, 0, 0, 0, 0]]
    from sklearn.metrics import confusion_matrix
    sk = confusion_matrix(HAND_REFS, [x or "-" for x in HAND_PREDS], labels=HAND_LABELS)
    np.testing.assert_array_equal(np.array(m["confusion"])[:, :4], sk)
    every_named = classification_metrics(["Other", "Arbitration", "Other"], ["Other", "Other", "Arbitration"], HAND_LABELS,
                                         n_boot=10)
    assert np.array(every_named["confusion"]).shape == (4, 4)  # no unmatched column when every prediction named a label
    assert every_named["confusion"][0][:2] == [1, 1] and every_named["confusion"][1][:2] == [1, 0]
