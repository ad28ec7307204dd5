"""classification_metrics against hand-computed accuracy, per-label and macro F1, and confusion matrix."""
import logging
import sys

import pytest

from deftx_engine.errors import DeftxError
from deftx_engine.outputs.inference import classification_metrics

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


def test_macro_labels_name_the_labels_the_average_covers():
    m = classification_metrics([0, 1], [0, 1], ["positive", "negative", "neutral"])
    assert m["macro_f1"] == 1.0 and m["macro_labels"] == ["positive", "negative"]  # neutral: neither true nor predicted


def test_predictions_csv_has_the_gold_label_when_the_input_has_one(tmp_path):
    import csv
    import io

    from deftx_engine.outputs.inference import prediction_inputs, write_predictions

    labelled = tmp_path / "l.csv"
    labelled.write_text("text,label\nenak,positive\nburuk,negative\n", encoding="utf-8")
    plain = tmp_path / "p.txt"
    plain.write_text("enak\nburuk\n", encoding="utf-8")
    texts, pairs, gold = prediction_inputs(labelled)
    assert (texts, pairs, gold) == (["enak", "buruk"], None, ["positive", "negative"])
    assert prediction_inputs(plain) == (["enak", "buruk"], None, None)
    with pytest.raises(DeftxError, match="unsupported extension"):  # --labelled: no fallback to plain lines
        prediction_inputs(plain, labelled=True)
    out = io.StringIO()
    write_predictions(out, ["negative", "positive"], [[0.2, 0.8], [0.9, 0.1]], texts, pairs, gold)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows == [["text", "label", "prediction", "p_negative", "p_positive"],
                    ["enak", "positive", "positive", "0.2000", "0.8000"],
                    ["buruk", "negative", "negative", "0.9000", "0.1000"]]
    out = io.StringIO()
    write_predictions(out, ["negative", "positive"], [[0.2, 0.8]], ["enak"])
    assert out.getvalue().splitlines()[0] == "text,prediction,p_negative,p_positive"


def test_composing_prints_no_load_report(tmp_path, capfd):
    """The composed model's classifier comes from the task vector: transformers' MISSING report is noise."""
    from transformers.utils import logging as hf_logging

    from deftx_engine.models.loading import load_cls_model
    from deftx_engine.outputs.inference import composed_model
    from tiny import make_tiny_model_dir, make_vector

    base = str(make_tiny_model_dir(tmp_path / "m"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # as in a fresh process (the CLI lowers it for the whole process)
    # transformers' handler keeps the stderr of the moment it was made (an earlier test's capture, maybe): point
    # it at this test's
    handlers = [h for h in hf_logging.get_logger().handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(sys.stderr) for h in handlers]
    try:
        vec = make_vector(load_cls_model(base, ["neg", "neu", "pos"]), base_model=base)
        assert "LOAD REPORT" in capfd.readouterr().err  # what the app's terminal showed for every build
        composed_model(vec)
        assert "LOAD REPORT" not in capfd.readouterr().err
        load_cls_model(base, ["neg", "neu", "pos"])  # the filter is gone afterwards: other loads still report
        assert "LOAD REPORT" in capfd.readouterr().err
    finally:
        hf_logging.set_verbosity(verbosity)
        for h, stream in zip(handlers, streams):
            if stream is not None:  # None: it was this stream already
                h.setStream(stream)
