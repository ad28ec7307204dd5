"""The reference no user runs: a plain dense fine-tune of every parameter with HF ``Trainer``.

Why a module: ``crosslingual``'s ``full-ft`` method and ``efficiency``'s whole-SFT comparison both measure DeFT-X
against it, so it has one home. Everything a user's run also does comes from the engine (tokenized examples,
the collator, phase 1's ``TrainingArguments``, the seed before loading); only what makes it the baseline is its
own: every parameter trains (LayerNorm included, the whole embedding matrix, no mask, no sparse phase), in
float32, without checkpoints.
"""
from __future__ import annotations

from pathlib import Path

from deftx_engine.method.embedding_rows import used_rows
from deftx_engine.models.loading import load_cls_model, load_tokenizer
from deftx_engine.models.precision import resolve as resolve_precision
from deftx_engine.training.config import TrainConfig
from deftx_engine.training.train import data_collator, load_examples, training_arguments


def dense_trainer(cfg: TrainConfig, out: Path, steps: int | None = None):
    """A ``Trainer`` ready to fine-tune ``cfg``'s task densely for ``steps`` (default ``cfg.full_steps``) steps
    with the engine's phase-1 settings; ``out`` is its scratch folder. Call ``.train()``; the model is
    ``.model``."""
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback

    tok = load_tokenizer(cfg.base_model)
    dataset, labels = load_examples(cfg, tok)
    set_seed(cfg.seed)
    model = load_cls_model(cfg.base_model, labels)
    args = training_arguments(cfg, out, steps or cfg.full_steps, resolve_precision(cfg.precision),  # as the SFT
                              checkpoints=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=data_collator(cfg, tok, used_rows(dataset.rows, tok)))
    trainer.remove_callback(PrinterCallback)  # as in a run: no raw loss dict per logged step
    return trainer
