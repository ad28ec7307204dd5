"""Composing a model for a target language, predicting with it, and scoring it (macro-F1, accuracy)."""
from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Sequence

import torch

from ..constants import Precision
from ..errors import DeftxError, VectorError
from ..method.vectors import SparseVector, compose
from ..models.loading import device, load_cls_model, load_tokenizer
from ..models.precision import resolve as resolve_precision
from ..training.data import TaskData, load_corpus, load_task_data


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (mean over the labels that occur in truth or prediction, as scikit-learn does; those
    labels are ``macro_labels``, so a front end can show the others' F1 as undefined rather than 0), per-label F1
    and the confusion matrix (rows: true label, columns: predicted)."""
    n = len(label_names)
    conf = torch.zeros(n, n, dtype=torch.int64)
    for t, p in zip(y_true, y_pred):
        conf[t, p] += 1
    tp = conf.diag().double()
    prec = tp / conf.sum(0).double().clamp(min=1)
    rec = tp / conf.sum(1).double().clamp(min=1)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec), torch.zeros_like(tp))
    present = (conf.sum(0) + conf.sum(1)) > 0
    total = int(conf.sum())
    return {"n": total, "accuracy": float(tp.sum() / total) if total else 0.0,
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
            "f1": {label_names[i]: float(f1[i]) for i in range(n)},
            "macro_labels": [label_names[i] for i in range(n) if bool(present[i])],
            "labels": list(label_names), "confusion": conf.tolist()}


def load_vectors(vectors: Sequence[str | Path | SparseVector]) -> list[SparseVector]:
    return [v if isinstance(v, SparseVector) else SparseVector.load(v) for v in vectors]


def composed_model(task: str | Path | SparseVector, languages: Sequence[str | Path | SparseVector] = (),
                   scales: Sequence[float] | None = None, base_model: str | None = None):
    """theta0 + phi_task + sum(phi_language): a classification model ready to predict, and its tokenizer.

    Every vector is validated against the base model before anything is applied.
    """
    vecs = load_vectors([task, *languages])
    if vecs[0].meta.kind != "task":
        raise VectorError(f"the first vector must be a task vector, got kind {vecs[0].meta.kind!r}")
    for v in vecs[1:]:
        if v.meta.kind != "language":
            raise VectorError(f"expected a language vector, got kind {v.meta.kind!r}")
    base = base_model or vecs[0].meta.base_model
    with _no_load_report():
        model = load_cls_model(base, vecs[0].meta.label_names)
    combined = compose(vecs, scales)
    combined.apply(model)
    return model.to(device()).eval(), load_tokenizer(base)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _no_load_report() -> Iterator[None]:
    """Without transformers' "LOAD REPORT ... classifier.bias MISSING" warning: a composed model's classifier
    comes from the task vector (applied next), so the missing head is expected, not a problem to report."""
    logger, drop = logging.getLogger("transformers.modeling_utils"), _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


CHARS_PER_TOKEN = 32  # texts are cut to max_length * this many characters before tokenizing


def _cut(texts: Sequence[str], n: int) -> list[str]:
    return [t if len(t) <= n else t[:n] for t in texts]


@torch.no_grad()
def predict_proba(model, tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
                  batch_size: int = 32, max_length: int = 128,
                  stop: Callable[[], str | None] | None = None, precision: Precision = "auto") -> torch.Tensor:
    """Label probabilities, one row per input (pairs for NLI-style tasks), in float32; ``precision`` is what
    the matrix products run in (``precision.resolve``: bf16 autocast where the hardware has it).

    The model reads ``max_length`` tokens, so each text is first cut to ``max_length * CHARS_PER_TOKEN``
    characters: a tokenizer truncating a pair needs memory growing with the square of its length (a 1 MB pair
    took 19 GB). ``stop`` is asked before each batch; a reason it returns ends the scoring with a
    ``DeftxError`` saying it (cancelled, or over a time limit)."""
    dev = next(model.parameters()).device
    chars = max_length * CHARS_PER_TOKEN
    enc = tokenizer(_cut(texts, chars), _cut(pairs, chars) if pairs else None, truncation=True,
                    max_length=max_length)
    # longest first, so batches hold texts of similar length (little padding) and memory peaks at once
    order = sorted(range(len(texts)), key=lambda i: -len(enc["input_ids"][i]))
    out = torch.empty(len(texts), model.config.num_labels)
    with torch.inference_mode(), resolve_precision(precision, dev).autocast():
        for i in range(0, len(order), batch_size):
            why = stop() if stop is not None else None
            if why:
                raise DeftxError(f"stopped after {i:,} of {len(texts):,} rows: {why}")
            rows = order[i:i + batch_size]
            batch = tokenizer.pad({k: [enc[k][j] for j in rows] for k in enc.keys()}, return_tensors="pt").to(dev)
            out[rows] = model(**batch).logits.float().softmax(-1).cpu()
    return out


def evaluate_task_data(model, tokenizer, td: TaskData, batch_size: int = 32,
                       stop: Callable[[], str | None] | None = None, precision: Precision = "auto") -> dict:
    """Scores ``model`` on labelled data whose labels were checked against the model's labels."""
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    probs = predict_proba(model, tokenizer, td.texts, td.text_pairs, batch_size, stop=stop, precision=precision)
    lid = {l: i for i, l in enumerate(names)}
    return classification_metrics([lid[l] for l in td.labels], probs.argmax(-1).tolist(), names)



def language_effect(diff: float) -> str:
    """What a language vector does to macro-F1 (composed minus task vector alone), in the words the CLI and the
    app share: a cost is said as a cost."""
    if diff > 0:
        return f"the language vector adds {diff:.3f} macro-F1"
    if diff < 0:
        return f"the language vector COSTS {-diff:.3f} macro-F1: it hurts here"
    return "the language vector changes nothing here"

def prediction_inputs(source, text_column: str | None = None, pair_column: str | None = None,
                      label_column: str = "label", max_rows: int | None = None, labelled: bool = False,
                      label_names: Sequence[str] | None = None) -> tuple[list[str], list[str] | None, list[str] | None]:
    """(texts, second texts or None, gold labels or None) of a file to predict: a labelled file (or one with
    premise/hypothesis columns) keeps its layout and its labels, anything else is read as one text per line.
    ``labelled`` refuses a file that is not a task file (with the reason) instead of falling back."""
    try:
        td = load_task_data(source, text_column=text_column, pair_column=pair_column, label_column=label_column,
                            label_names=label_names if labelled else None, max_rows=max_rows)
    except DeftxError:
        if labelled:
            raise
        return load_corpus(source, text_column, max_lines=max_rows), None, None
    return td.texts, td.text_pairs, td.labels


def write_predictions(out: IO[str], names: Sequence[str], probs: Sequence[Sequence[float]], texts: Sequence[str],
                      pairs: Sequence[str] | None = None, gold: Sequence[str] | None = None) -> None:
    """The predictions CSV of the CLI and the app: text, second text (pair tasks), the gold label when the input
    has one, the predicted label and each label's probability."""
    w = csv.writer(out)
    w.writerow(["text"] + (["second_text"] if pairs else []) + (["label"] if gold else []) + ["prediction"]
               + [f"p_{n}" for n in names])
    for i, row in enumerate(probs):
        best = max(range(len(row)), key=row.__getitem__)
        w.writerow([texts[i]] + ([pairs[i]] if pairs else []) + ([gold[i]] if gold else []) + [names[best]]
                   + [f"{p:.4f}" for p in row])
