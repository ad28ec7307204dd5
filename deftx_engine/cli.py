"""The ``deftx`` command: train, compose, evaluate, predict, inspect, push and pull sparse vectors."""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from .constants import KINDS, MERGES, PRECISIONS, TIES_DENSITY, TIES_LAMBDA
from .errors import DeftxError, clipped, option
from .fileio import atomic_open, atomic_write_text, check_output_file


def _parse_bool(text: str) -> bool:
    """``--fit-head false``: a bool option takes a word, so a preset's or config file's True can be turned off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _option_kwargs(typ: Any) -> dict[str, Any]:
    """argparse settings for a ``TrainConfig`` field from its type object: ``X | None`` takes an X, ``Literal``
    its values as choices, ``bool`` a true/false word."""
    if typing.get_origin(typ) is Literal:
        return {"choices": list(typing.get_args(typ))}
    typ = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # X | None: X
    if typ is bool:
        return {"type": _parse_bool, "metavar": "{true,false}"}
    return {"type": typ} if typ in (int, float) else {}


def _add_train_parser(sub, kind: str):
    from .models.presets import PRESETS
    from .training.config import FIELDS, field_types

    p = sub.add_parser(f"train-{kind}", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help=f"train a {kind} SFT (full FT -> denoise -> mask -> sparse FT)",
                       description=f"Train a {kind} sparse fine-tuning. Writes status.json, metrics.jsonl, "
                                   "log.txt and vector/ to --output-dir. Settings: explicit options win over "
                                   "--config, --config over --preset, --preset over the defaults.")
    p.add_argument("--output-dir", required=True, help="run folder (refused if it holds a different run)")
    p.add_argument("--preset", help=f"named settings: {' or '.join(PRESETS)}; explicit options win")
    p.add_argument("--config", help="a JSON file of settings (the keys are these options' names with _, e.g. "
                                    "full_steps; a web-app run's config.json); explicit options win")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a different run in --output-dir")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the phase checkpoints after the vector is saved (deleted by default: hundreds of MB)")
    types = field_types()
    for name, f in FIELDS.items():
        if name == "kind":
            continue
        if f.default is dataclasses.MISSING:
            note = " (required unless --config gives it)"
        else:
            note = f" (default: {f.default})" if f.default is not None else ""
        p.add_argument(option(name), help=f.metadata["help"] + note, default=argparse.SUPPRESS,
                       **_option_kwargs(types[name]))
    p.set_defaults(func=lambda a: _train(a, kind))
    return p


def _train(args, kind: str) -> int:
    from .training.config import FIELDS, resolve
    from .training.progress import PlainProgress
    from .training.runs import RunDir, StopFlag
    from .training.train import train_sft

    if args.resume:  # before anything is read: a deleted run folder is said, not found out mid-run
        RunDir(args.output_dir).require_run("--resume: --output-dir", queued=True,
                                            hint="There is nothing to resume: start the run anew.")
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    cfg = resolve(kind, preset_name=args.preset, file=args.config, values=given)
    print("configuration:", json.dumps(cfg.to_dict(), indent=2), file=sys.stderr)
    stop = StopFlag().install()
    plain = not sys.stderr.isatty()  # a terminal gets the trainer's bars and story instead
    run = PlainProgress(args.output_dir, cfg.logging_steps) if plain else RunDir(args.output_dir)
    try:
        out = train_sft(cfg, run, stop=stop, resume=args.resume, overwrite=args.overwrite,
                        keep_checkpoints=args.keep_checkpoints)
    finally:
        if plain:
            run.show_log()  # the story's last lines (vector saved, stopped, ...)
    if out is None:
        run.update(state="cancelled", message="stopped by a signal; resuming continues from its last checkpoint")
        print(f"cancelled; the last checkpoint is in {args.output_dir}: run the same command with --resume to "
              "continue", file=sys.stderr)
        return 128 + (stop.signal or signal.SIGTERM)
    print(out)
    return 0


def _finite(text: str) -> float:
    """An option's number (``--scale``, ``--ties-*``): a NaN or infinity is refused naming the option, not found
    later in a vector's values."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _composed(args):
    """The model and tokenizer that ``--task``/``--language``/``--scale``/``--merge`` describe."""
    from .outputs.inference import composed_model

    n = 1 + len(args.language or [])
    if args.scale and args.merge == "sum" and len(args.scale) != n:
        raise DeftxError(f"--scale takes one value per vector, the task's first: {len(args.scale)} given for {n} "
                         "vectors")
    if args.merge == "sum":
        return composed_model(args.task, args.language or [], args.scale)
    if args.scale:
        raise DeftxError("--scale applies to --merge sum; TIES scales the merged vector by --ties-lambda")
    from .method.merge import ties_merge
    from .outputs.inference import load_vectors

    return composed_model(ties_merge(load_vectors([args.task, *(args.language or [])]), args.ties_density,
                                     args.ties_lambda))


def _classifier(args):
    """The composed classifier, its tokenizer and label names for evaluate / predict; an ``--output`` that could
    not be written is refused before the model is built."""
    if args.output:
        check_output_file(args.output, "--output")
    model, tok = _composed(args)
    return model, tok, [model.config.id2label[i] for i in range(model.config.num_labels)]


COMPOSED_MARKER = "deftx_composed.json"  # written into compose's output: the one folder compose may replace


def _compose(args) -> int:
    from .fileio import atomic_dir, check_replaceable

    out = Path(args.output_dir)
    check_replaceable(out, COMPOSED_MARKER)  # before the model is built
    model, tok = _composed(args)
    with atomic_dir(out, COMPOSED_MARKER) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / COMPOSED_MARKER).write_text(json.dumps({"task": args.task, "language": args.language or [],
                                                       "merge": args.merge}, indent=2), encoding="utf-8")
    print(out)
    return 0


def _evaluate(args) -> int:
    from .outputs.inference import evaluate_task_data
    from .training.data import load_task_data

    model, tok, names = _classifier(args)
    td = load_task_data(args.data, text_column=args.text_column, pair_column=args.pair_column,
                        label_column=args.label_column, label_names=names)
    result = {"data": args.data, "task": args.task, "language": args.language or [],
              **evaluate_task_data(model, tok, td, precision=args.precision)}
    if args.language:  # what the language vectors add or cost is never left for the user to work out
        from .outputs.inference import composed_model, language_effect

        alone = evaluate_task_data(*composed_model(args.task, []), td, precision=args.precision)
        diff = result["macro_f1"] - alone["macro_f1"]
        result["task_only"] = {k: alone[k] for k in ("macro_f1", "accuracy")}
        result["language_effect_macro_f1"] = diff
        summary = (f"macro-F1 {result['macro_f1']:.3f} with the language vector, {alone['macro_f1']:.3f} with the "
                   f"task vector alone, on {result['n']:,} rows of {args.data}: {language_effect(diff)}")
    else:
        summary = (f"macro-F1 {result['macro_f1']:.3f}, accuracy {result['accuracy']:.3f}, on {result['n']:,} rows "
                   f"of {args.data}")
    text = json.dumps(result, indent=2)
    if args.output:  # written aside and renamed: a reader never sees half a file
        atomic_write_text(args.output, text + "\n")
    print(summary, file=sys.stderr if args.json else sys.stdout)  # stdout stays pure JSON with --json
    if args.json:
        print(text)
    return 0


def _predict(args) -> int:
    from .outputs.inference import predict_proba, prediction_inputs, write_predictions

    model, tok, names = _classifier(args)
    gold = None
    if args.data:
        texts, pairs, gold = prediction_inputs(args.data, args.text_column, args.pair_column, args.label_column,
                                               labelled=args.labelled, label_names=names)
    else:
        if not args.text:
            raise DeftxError("give --text (and --text-pair for pair tasks) or --data FILE")
        texts, pairs = [args.text], [args.text_pair] if args.text_pair else None
    probs = predict_proba(model, tok, texts, pairs, precision=args.precision).tolist()
    if not args.output:
        write_predictions(sys.stdout, names, probs, texts, pairs, gold)
        return 0
    with atomic_open(args.output, "w", newline="") as out:  # an interrupted write leaves the old file
        write_predictions(out, names, probs, texts, pairs, gold)
    return 0


def _inspect(args) -> int:
    from .outputs.report import inspect_report, text_summary

    for flag, path in (("--html", args.html), ("--output", args.output)):
        if path:
            check_output_file(path, flag)
    if args.run:
        from .training.runs import RunDir

        RunDir(args.run).require_run("--run")
    report = inspect_report(args.vectors, run=args.run, html=args.html)
    text = json.dumps(report, indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text if args.json else text_summary(report))
    return 0


def _push(args) -> int:
    from .hub.transfer import push_vector

    print(push_vector(args.vector, args.repo_id, token=args.token, private=args.private))
    return 0


def _pull(args) -> int:
    from .hub.transfer import pull_vector

    print(pull_vector(args.repo_id, args.output_dir, token=args.token, revision=args.revision))
    return 0


def _gallery(args) -> int:
    """List released and pushed vectors; says whether the Hub answered or the shipped catalogue was used."""
    from .hub.gallery import load_gallery

    gallery = load_gallery(timeout=args.timeout).select(base=args.base, kind=args.kind, language=args.language)
    if args.json:
        print(json.dumps(gallery.to_dict(), indent=2))
        return 0
    print(gallery.status)
    rows = [("id", "kind", "base model", "language", "task", "note")] + [
        (e.id, e.kind, e.base_model, f"{e.language} {e.language_name}".strip(), e.task,
         "needs the Hub" if e.source == "catalogue" else e.note) for e in gallery.entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    n = len(gallery.entries)
    print(f"{n} vector{'s' if n != 1 else ''}" + ("" if gallery.hub_answered else "; downloading any needs the Hub"))
    return 0


def _command(sub, name: str, func, summary: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary)
    p.set_defaults(func=func)
    return p


def _model_args(p) -> None:
    """The options that name a composed model: the vectors and how they are merged."""
    p.add_argument("--task", required=True, help="task vector folder")
    p.add_argument("--language", action="append", help="language vector folder (repeatable)")
    p.add_argument("--scale", type=_finite, nargs="+", help="one scale per vector (task first); default 1")
    p.add_argument("--merge", choices=MERGES, default="sum",
                   help="sum = θ0 + the vectors; ties = TIES merging (trim each vector to --ties-density "
                        "of its entries, elect a sign per entry, average the agreeing values) (default: sum)")
    p.add_argument("--ties-density", type=_finite, default=TIES_DENSITY,
                   help=f"--merge ties: share of each vector's entries kept (default: {TIES_DENSITY})")
    p.add_argument("--ties-lambda", type=_finite, default=TIES_LAMBDA,
                   help=f"--merge ties: scale of the merged vector (default: {TIES_LAMBDA})")


def _data_args(p, required: bool) -> None:
    """The options that say what to score and how: the data file, its columns, the number format."""
    p.add_argument("--data", required=required, help="labelled or unlabelled file (.csv/.tsv/.jsonl/.txt)")
    p.add_argument("--text-column", help="text column (default: auto-detect)")
    p.add_argument("--pair-column", help="second text column for pair tasks")
    p.add_argument("--label-column", default="label", help="label column (default: label)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="number format of the matrix products: auto = bf16 autocast on a GPU or CPU with bf16 "
                        "matrix units, float32 elsewhere (default: auto)")


def _add_model_parsers(sub) -> None:
    """compose, evaluate and predict: the commands that build a model from vectors."""
    p = _command(sub, "compose", _compose, "θ0 + task + language vectors -> a standard HF model folder")
    _model_args(p)
    p.add_argument("--output-dir", required=True, help="where to write the model (loads with transformers.pipeline)")

    p = _command(sub, "evaluate", _evaluate, "macro-F1 and accuracy of a composed model (--json: also per class and "
                 "the confusion matrix); with --language also the task vector alone, and the difference")
    _model_args(p)
    _data_args(p, True)
    p.add_argument("--output", help="also write the whole result as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the whole result (per-class scores, confusion "
                                                       "matrix) as JSON instead of the one-line summary")

    p = _command(sub, "predict", _predict, "label probabilities for --text or every line of --data (CSV)")
    _model_args(p)
    _data_args(p, False)
    p.add_argument("--text", help="one input text")
    p.add_argument("--text-pair", help="its pair (NLI hypothesis)")
    p.add_argument("--labelled", action="store_true",
                   help="--data must be a labelled task file (without it, one is detected: its labels go to the CSV)")
    p.add_argument("--output", help="write the CSV here instead of stdout")


def _add_vector_parsers(sub) -> None:
    """inspect, push, pull and gallery: the commands that look at, share or find vectors."""
    p = _command(sub, "inspect", _inspect, "spectra, mask densities and overlap -> JSON and a Plotly HTML report")
    p.add_argument("vectors", nargs="+", help="one or more vector folders (overlap is reported for each pair)")
    p.add_argument("--run", help="a run folder whose spectra.json to include")
    p.add_argument("--html", help="write a standalone Plotly report here")
    p.add_argument("--output", help="also write the whole report as JSON here")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of a summary")

    p = _command(sub, "push", _push, "upload a vector folder with a model card to the Hugging Face Hub")
    p.add_argument("vector", help="vector folder")
    p.add_argument("repo_id", help="e.g. user/deftx-jav-language")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN); never printed or stored")

    p = _command(sub, "pull", _pull, "download a vector (ours or composable-sft's pytorch_diff.bin) from the Hub")
    p.add_argument("repo_id", help="Hub repo id or a local folder")
    p.add_argument("--output-dir", required=True, help="where to put the vector folder")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--token", help="Hugging Face token for private repos (default: $HF_TOKEN)")

    from .hub.contact import HUB_TIMEOUT

    p = _command(sub, "gallery", _gallery, "released (composable-sft) and pushed language and task vectors, from the "
                 "Hub or, when it does not answer, the catalogue shipped with DeFT-X")
    p.add_argument("--base", help="only vectors for this base model (e.g. xlmr, mbert, FacebookAI/xlm-roberta-base)")
    p.add_argument("--kind", choices=KINDS, help="only language or only task vectors")
    p.add_argument("--language", help="only vectors for this language (code such as jav, or name such as Javanese)")
    p.add_argument("--timeout", type=float, default=HUB_TIMEOUT,
                   help=f"seconds to wait for the Hub before using the catalogue (default: {HUB_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="print the gallery as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deftx", description="DeFT-X: composable, SVD-denoised sparse "
                                     "fine-tunings for zero-shot cross-lingual transfer.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub, "language")
    _add_train_parser(sub, "task")
    _add_model_parsers(sub)
    _add_vector_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # θ0, φ or a user's text never stop a command on an ASCII console
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    if not os.environ.get("DEFTX_VERBOSE"):  # transformers' load reports list every new head weight
        hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():  # a log file gets no "Loading weights" bars
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except DeftxError as e:
        print(f"deftx: error: {clipped(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder that cannot be read or written: one line naming it
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"deftx: error: {clipped(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
