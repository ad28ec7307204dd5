"""classification_metrics against hand-computed accuracy, per-label and macro F1, and confusion matrix."""
import pytest

from deftx_engine.evaluate import classification_metrics

# true a a b b c c / predicted a b b b a c
TRUE, PRED = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]


def test_hand_computed_figures():
    m = classification_metrics(TRUE, PRED, ["a", "b", "c"])
    assert m["n"] == 6 and m["labels"] == ["a", "b", "c"]
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: true label, columns: predicted
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: precision 1/2, recall 1/2 -> 0.5; b: 2/3, 1 -> 0.8; c: 1, 1/2 -> 2/3
    assert m["f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_labels_absent_from_truth_and_prediction_do_not_count_in_macro_f1():
    m = classification_metrics(TRUE, PRED, ["a", "b", "c", "d"])
    assert m["f1"]["d"] == 0.0 and m["confusion"][3] == [0, 0, 0, 0]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a label predicted but never true does count (F1 0), as in scikit-learn
    assert classification_metrics([0, 0], [0, 1], ["a", "b"])["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_perfect_and_empty():
    assert classification_metrics([0, 1, 1], [0, 1, 1], ["a", "b"])["macro_f1"] == 1.0
    empty = classification_metrics([], [], ["a", "b"])
    assert empty["n"] == 0 and empty["accuracy"] == 0.0 and empty["macro_f1"] == 0.0
