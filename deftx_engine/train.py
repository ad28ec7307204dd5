"""The two-phase SFT trainer: full fine-tune -> (denoise) -> global top-k mask -> reset -> sparse fine-tune.

Built on Hugging Face ``Trainer``, so both phases get logging, gradient accumulation, mixed precision on a
GPU, checkpoints/resume and multi-process training under ``torchrun`` / ``accelerate launch``.
Progress goes to the run folder (``runs.RunDir``), which is all the web app reads.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from .config import TrainConfig
from .data import load_corpus, load_task_data
from .denoise import denoise_deltas
from .embedding_rows import MLMCollator, train_rows_only, used_rows
from .errors import ConfigError
from .fileio import atomic_write_bytes, write_json_atomic
from .masks import k_from, select_top_k
from .mlm_head import HeadFitConfig, cached_fit, masked_lm_scores, split_heldout
from .models import load_cls_model, load_mlm_model, load_tokenizer
from .optim import SparseAdamW
from .params import parameter_roles, restrict
from .phase1 import load_deltas, save_deltas
from .precision import Amp
from .precision import resolve as resolve_precision
from .runs import RunDir, StopFlag, read_json
from .vectors import SparseVector, VectorMeta, base_fingerprint


# ---- data --------------------------------------------------------------------------------------------
class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], lines: list[str] | None = None, heldout: list[str] | None = None):
        self.rows = rows
        self.lines, self.heldout = lines or [], heldout or []  # language SFTs: training / held-out text

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def load_examples(cfg: TrainConfig, tokenizer, label_names: list[str] | None = None):
    """Read and tokenize the run's data; returns (dataset, label_names or None). Fails before training."""
    if cfg.kind == "language":
        lines = load_corpus(cfg.data, cfg.text_column, max_lines=cfg.max_lines, max_bytes=cfg.max_bytes)
        lines, heldout = split_heldout(lines, cfg.heldout_share)
        enc = tokenizer(lines, truncation=True, max_length=cfg.max_length)
        rows = [{k: enc[k][i] for k in enc} for i in range(len(lines))]
        return _Examples(rows, lines, heldout), None
    td = load_task_data(cfg.data, text_column=cfg.text_column, pair_column=cfg.pair_column,
                        label_column=cfg.label_column, label_names=label_names, max_rows=cfg.max_lines,
                        max_bytes=cfg.max_bytes)
    enc = tokenizer(td.texts, td.text_pairs, truncation=True, max_length=cfg.max_length)
    lid = {l: i for i, l in enumerate(td.label_names)}
    rows = [{**{k: enc[k][i] for k in enc}, "labels": lid[td.labels[i]]} for i in range(len(td))]
    return _Examples(rows), td.label_names


def data_collator(cfg: TrainConfig, tokenizer, rows: torch.Tensor):
    """What turns a run's examples into batches: padding, and for a language SFT masking whose random tokens come
    from ``rows`` (the corpus's ids, ``embedding_rows.used_rows``). Public so benchmarks batch as a run does."""
    from transformers import DataCollatorWithPadding

    if cfg.kind == "language":
        return MLMCollator(tokenizer, cfg.mlm_probability, rows)
    return DataCollatorWithPadding(tokenizer)


def _rows_only(model, roles, cfg: TrainConfig, rows: torch.Tensor):
    """Phase 1 trains just the used rows of the word embedding (embedding_rows.py), when that is exact:
    no weight decay, and the matrix is maskable and trained."""
    emb = getattr(model, model.base_model_prefix).get_input_embeddings()
    name = next((n for n, p in model.named_parameters() if p is emb.weight), None)
    if cfg.weight_decay == 0 and name in roles.maskable and emb.weight.requires_grad:
        return train_rows_only(emb, rows)
    return contextlib.nullcontext()


# ---- progress ----------------------------------------------------------------------------------------
PHASE_NAMES = {"full": "phase 1/2: full fine-tuning", "sparse": "phase 2/2: sparse fine-tuning"}


def _progress_callback(run: RunDir, phase: str, offset: int, total: int, stop: StopFlag | None):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Writes status/metrics for watchers and turns a stop signal into a clean stop with a checkpoint."""

        def __init__(self):
            self.t0 = time.time()
            self.first = None
            self.last_write = 0.0
            self.loss = None
            self.bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:  # a terminal gets a bar per phase; a log file (the app's jobs) none
                # the phase's own message (the app shows the last non-empty one): not "denoising and selecting…"
                run.update(phase=phase, message=PHASE_NAMES.get(phase, phase))
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=PHASE_NAMES.get(phase, phase),
                                unit="step", disable=None, dynamic_ncols=True)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        def on_step_end(self, args, state, control, **kw):
            if stop:
                control.should_training_stop = True
                control.should_save = True
            if not state.is_world_process_zero:
                return
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            now = time.time()
            if self.first is None:
                self.first = (now, state.global_step)
            if now - self.last_write > 0.5 or state.global_step == state.max_steps:
                done = offset + state.global_step
                t_first, s_first = self.first
                rate = (now - t_first) / max(state.global_step - s_first, 1)
                eta = rate * (total - done) if state.global_step > s_first else None
                run.update(state="running", phase=phase, step=done, total_steps=total, loss=self.loss,
                           eta_seconds=eta)
                self.last_write = now

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.loss = float(logs["loss"])
                run.update(loss=self.loss)  # on_step_end ran before this step's log: keep status current
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{self.loss:.3f}", refresh=False)
                run.log_metrics({"phase": phase, "step": offset + state.global_step, "loss": self.loss,
                                 "lr": logs.get("learning_rate"),
                                 "phase_step": state.global_step, "phase_steps": state.max_steps})  # the CLI's lines

    return Progress()


# ---- phases ------------------------------------------------------------------------------------------
def _last_checkpoint(folder: Path) -> str | None:
    """Newest *complete* checkpoint: Trainer writes trainer_state.json last, so a process killed while
    saving leaves a folder without a readable one, which is skipped."""
    ckpts = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if folder.exists() else []
    for ckpt in reversed(ckpts):
        if read_json(ckpt / "trainer_state.json") is not None:
            return str(ckpt)
    return None


def training_arguments(cfg: TrainConfig, out: Path, steps: int, amp: Amp, *, sparse: bool = False,
                       checkpoints: bool = True):
    """The ``TrainingArguments`` of one phase (its optimizer, schedule, clipping and precision). Public so
    benchmarks time and compare against the optimizer and schedule a run really uses; ``checkpoints=False``
    for a measurement that never resumes."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", logging_steps=cfg.logging_steps,
        save_strategy="steps" if checkpoints else "no", save_steps=cfg.save_steps, save_total_limit=1,
        report_to="none", seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
        fp16=amp.dtype == torch.float16, bf16=amp.dtype == torch.bfloat16,
        remove_unused_columns=False, torch_compile=cfg.compile,
        dataloader_num_workers=0, disable_tqdm=True,  # our own bar names the phase (_progress_callback)
        ddp_find_unused_parameters=cfg.kind == "language",  # MLM heads carry a bias the loss may not use
        max_grad_norm=0.0 if sparse else 1.0,  # the sparse optimizer clips masked grads itself
    )


def _run_phase(model, cfg, dataset, collator, out: Path, steps: int, run: RunDir, phase: str, offset: int,
               total: int, stop: StopFlag | None, amp: Amp, optimizer=None, resume: bool = False) -> bool:
    """Train one phase with ``Trainer``; False if a stop signal ended it early (a checkpoint was saved)."""
    from transformers import Trainer

    args = training_arguments(cfg, out, steps, amp, sparse=optimizer is not None)
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      optimizers=(optimizer, None),
                      callbacks=[_progress_callback(run, phase, offset, total, stop)])
    trainer.remove_callback(PrinterCallback)  # raw loss dicts: the bar and metrics.jsonl carry them
    trainer.train(resume_from_checkpoint=_last_checkpoint(out) if resume else None)
    return not stop


def trainable_setup(model: nn.Module, roles, mask: dict | None) -> None:
    """Phase 1: everything but frozen params trains. Phase 2: only masked params and heads."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in roles.frozen:
            p.requires_grad_(False)
        elif mask is not None and name in roles.maskable:
            p.requires_grad_(name in mask and mask[name].numel() > 0)


def _head_fit_progress(run: RunDir):
    """Step, steps (at most: the fit ends early once the held-out loss stops falling) and ETA of the head fit in
    status.json, at most every half second: the longest step on a new corpus shows progress like the phases."""
    t0, last = time.time(), [0.0]

    def update(step: int, total: int) -> None:
        now = time.time()
        if now - last[0] > 0.5 or step == total:
            run.update(step=step, total_steps=total, eta_seconds=(now - t0) / step * (total - step))
            last[0] = now

    return update


def _max_positions(model, tokenizer) -> int:
    """Tokens per example the model can read: its position embeddings (less RoBERTa's padding offset), or the
    tokenizer's limit if that is lower."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or 1 << 30
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (config.pad_token_id or 0) + 1
    limit = getattr(tokenizer, "model_max_length", None)
    return min(positions, limit) if isinstance(limit, int) and limit < 1 << 30 else positions


def _weights_key(model, name: str) -> str:
    """Identifies a base model's weights (not only its shapes) for caches: name + a sample of each tensor."""
    import hashlib

    h = hashlib.sha256(name.encode())
    for n, p in model.named_parameters():
        if n.startswith(model.base_model_prefix + "."):
            h.update(n.encode() + p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _heldout_scores(model, tokenizer, lines: list[str], cfg: TrainConfig) -> dict | None:
    """In float32 whatever the run's precision: the evidence compares runs, so it is scored one way."""
    return masked_lm_scores(model, tokenizer, lines, max_length=cfg.max_length, seed=cfg.seed) if lines else None


def _heldout_report(model, tokenizer, lines, cfg: TrainConfig, before: dict, theta0: dict, heads: list[str]) -> dict:
    """Masked-token loss / top-1 on the held-out lines: theta0 (with its fitted head), theta0 + phi (the
    whole vector), and theta0 + phi's encoder under theta0's head -- the part that composition uses."""
    after = _heldout_scores(model, tokenizer, lines, cfg)
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in heads}
    with torch.no_grad():
        for n in heads:
            params[n].copy_(theta0[n])
        encoder_only = _heldout_scores(model, tokenizer, lines, cfg)
        for n in heads:
            params[n].copy_(trained[n])
    summary = (f"held-out masked-token loss on {len(lines)} lines: theta0 {before['loss']:.3f} "
               f"(top-1 {before['accuracy']:.1%}) -> theta0 + phi {after['loss']:.3f} (top-1 {after['accuracy']:.1%});"
               f" encoder of phi with theta0's head {encoder_only['loss']:.3f}")
    return {"lines": len(lines), "theta0": before, "theta0+phi": after, "encoder_only": encoder_only,
            "summary": summary}


def train_sft(cfg: TrainConfig, run: RunDir, *, stop: StopFlag | None = None, resume: bool = False,
              overwrite: bool = False, keep_checkpoints: bool = False,
              phase1_cache: str | Path | None = None) -> Path | None:
    """Run both phases and save the vector to ``run.vector_dir``; returns None if stopped by a signal.

    Once the vector is saved the phase checkpoints (hundreds of MB) are deleted unless ``keep_checkpoints``.
    ``phase1_cache``: a file for the phase-1 delta, read if it exists (phase 1 is skipped), else written
    after phase 1 -- key it by ``cfg.phase1_settings()`` so that only runs sharing phase 1 share the file.

    Data, settings and the output folder are all checked before the folder is claimed or a model loaded.
    """
    from transformers import set_seed

    started = time.time()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    main = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes the run folder
    tokenizer = load_tokenizer(cfg.base_model)
    dataset, label_names = load_examples(cfg, tokenizer)
    set_seed(cfg.seed)
    model = (load_mlm_model(cfg.base_model, cfg.mlm_layer) if cfg.kind == "language"
             else load_cls_model(cfg.base_model, label_names))
    amp = resolve_precision(cfg.precision)
    positions = _max_positions(model, tokenizer)
    if cfg.max_length > positions:
        raise ConfigError(f"max_length {cfg.max_length:,} is more than {cfg.base_model} reads ({positions:,} tokens)",
                          field="max_length")
    if cfg.source_language_vector:
        SparseVector.load(cfg.source_language_vector).apply(model, heads=False)
    roles = restrict(parameter_roles(model), cfg.param_groups)
    if not roles.maskable:
        raise ConfigError(f"{cfg.base_model}: no maskable parameters found"
                          + (f" in the groups {cfg.param_groups}" if cfg.param_groups != "all" else ""),
                          field="param_groups")
    params = dict(model.named_parameters())
    n_maskable = sum(params[n].numel() for n in roles.maskable)
    k = k_from(cfg.k, n_maskable)
    if k > n_maskable:
        raise ConfigError(f"k = {k:,} is larger than the {n_maskable:,} maskable parameters of {cfg.base_model}",
                          field="k")
    fits_head = cfg.kind == "language" and cfg.fit_head and model.head_is_new
    head_text = load_corpus(cfg.head_corpus, max_bytes=cfg.max_bytes) if fits_head and cfg.head_corpus else None
    if main:  # everything is checked: only now is the output folder claimed
        resume = run.claim(cfg.to_dict(), resume=resume, overwrite=overwrite)
    with run.writing(), run.record_failure(main):  # any error from here on marks the run failed (with its message)
        log = run.log_file.open("a", encoding="utf-8") if main else None

        def say(msg: str) -> None:
            if log:
                log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
                log.flush()
                if sys.stderr.isatty():  # a person at a terminal reads the same story as log.txt
                    print(msg, file=sys.stderr, flush=True)

        say(f"precision: {amp.why}")
        if main:
            run.update(precision=amp.name)
        heads = [n for n in roles.heads if params[n].requires_grad]
        head_fit = None
        if fits_head:
            if main:
                run.update(state="running", phase="head-fit", message="fitting the MLM head (once per base model "
                                                                      "and text; cached)")
            # in float32 whatever the run's precision: in bf16 the fit of a 250k-piece head did not converge
            head_fit = cached_fit(model, tokenizer, _weights_key(model, cfg.base_model), head_text or dataset.lines,
                                  HeadFitConfig(max_length=cfg.max_length), progress=say,
                                  stop=lambda: bool(stop), on_step=_head_fit_progress(run) if main else None)
            if head_fit["stopped"]:
                if main:
                    run.update(step=head_fit["steps"])
                say(f"MLM head fit stopped by a signal at step {head_fit['steps']}; kept: the next run on this "
                    "base model and text goes on from there")
                return None
            say(f"MLM head {'loaded from the cache' if head_fit['cached'] else 'fitted'}: held-out loss "
                f"{head_fit['heldout']['loss']:.3f}, top-1 {head_fit['heldout']['accuracy']:.1%}")
        theta0 = {n: params[n].detach().clone() for n in roles.maskable + heads}  # a fitted head is theta0's
        heldout = _heldout_scores(model, tokenizer, dataset.heldout, cfg) if cfg.kind == "language" else None
        full, sparse = cfg.planned_steps(len(dataset), world)
        total = full + sparse
        rows = used_rows(dataset.rows, tokenizer)
        collator = data_collator(cfg, tokenizer, rows)

        say(f"{cfg.kind} SFT of {cfg.base_model}: {len(dataset)} examples, k = {k:,} of {n_maskable:,} maskable "
            f"({k / n_maskable:.2%}), {full} full + {sparse} sparse steps, method {cfg.method}")
        if main:
            run.update(state="running", phase="full", step=0, total_steps=total, message="")

        # phase 1: full fine-tuning, unless a mask from an earlier attempt exists and a sparse phase follows
        # (without one, the vector is the masked phase-1 delta: phase 1 resumes from its last checkpoint)
        if resume and cfg.sparse_phase and run.mask_file.exists():
            mask = {n: t.long() for n, t in load_file(str(run.mask_file)).items()}
            say("resumed: mask found, phase 1 skipped")
        else:
            # the heads' phase-1 delta too: without a sparse phase the vector keeps the phase-1 heads
            shapes = {n: params[n].shape for n in roles.maskable + heads}
            deltas = load_deltas(phase1_cache, cfg.phase1_settings(), shapes) if phase1_cache else None
            if deltas is not None:
                with torch.no_grad():
                    for n in heads:
                        params[n].copy_(theta0[n] + deltas.pop(n).to(params[n].dtype))
                say(f"phase 1 reused: its delta read from {phase1_cache}")
            else:
                trainable_setup(model, roles, None)
                with _rows_only(model, roles, cfg, rows):
                    finished = _run_phase(model, cfg, dataset, collator, run.path / "phase1", full, run, "full", 0,
                                          total, stop, amp, resume=resume)
                if not finished:
                    return None
                deltas = {n: params[n].detach().float() - theta0[n].float() for n in roles.maskable + heads}
                if phase1_cache and main:
                    save_deltas(phase1_cache, deltas, cfg.phase1_settings())
                for n in heads:
                    del deltas[n]
            if main:
                run.update(phase="denoise", step=full, message="denoising and selecting the mask")
            t = time.time()
            if cfg.method == "deftx":
                deltas, records = denoise_deltas(deltas, cfg.denoise_config(), inplace=True)
                if main:
                    write_json_atomic(run.spectra_file, {n: asdict(r) for n, r in records.items()})
            mask = select_top_k(deltas, k)
            if main:
                atomic_write_bytes(run.mask_file, save({n: i.to(torch.int32).contiguous() for n, i in mask.items()}))
            say(f"mask of {k:,} entries chosen in {time.time() - t:.1f}s")
            if not cfg.sparse_phase:  # ablation: keep the masked phase-1 (denoised) delta, no retraining
                with torch.no_grad():
                    for n in roles.maskable:
                        flat = params[n].data.view(-1)
                        flat.copy_(theta0[n].view(-1))
                        flat[mask[n]] += deltas[n].view(-1)[mask[n]].to(flat.dtype)
            del deltas

        # phase 2: reset to theta0, train only the masked entries (and the heads, densely)
        if cfg.sparse_phase:
            with torch.no_grad():
                for n, t0 in theta0.items():
                    params[n].data.copy_(t0)
            trainable_setup(model, roles, mask)
            opt = SparseAdamW([(params[n], mask[n]) for n in roles.maskable if params[n].requires_grad] +
                              [(params[n], None) for n in heads], lr=cfg.lr, weight_decay=cfg.weight_decay)
            finished = _run_phase(model, cfg, dataset, collator, run.path / "phase2", sparse, run, "sparse", full,
                                  total, stop, amp, optimizer=opt, resume=resume)
            if not finished:
                return None
            say(f"sparse phase optimizer state: {opt.state_bytes():,} bytes")

        if not main:
            return run.vector_dir
        if heldout is not None:
            heldout = _heldout_report(model, tokenizer, dataset.heldout, cfg, heldout, theta0, heads)
            run.log_metrics({"phase": "heldout", **heldout})
            say(heldout["summary"])
        run.update(phase="save", step=total, message="saving the vector")
        meta = VectorMeta(kind=cfg.kind, base_model=cfg.base_model, base_fingerprint=base_fingerprint(model),
                          language=cfg.language, label_names=list(label_names or []),
                          method=cfg.method if cfg.sparse_phase else f"{cfg.method}-no-retrain",
                          denoise=cfg.denoise_config().to_dict() if cfg.method == "deftx" else None,
                          extra={"train": cfg.to_dict(), "n_maskable": n_maskable,
                                 **({"heldout_mlm": heldout} if heldout else {}),
                                 **({"mlm_head": {k: head_fit[k] for k in ("heldout", "steps", "layer", "n_lines")}}
                                    if head_fit else {})})
        vec = SparseVector.from_diff(meta, theta0, model, mask, heads)
        vec.save(run.vector_dir)
        if not keep_checkpoints:
            for phase in ("phase1", "phase2"):
                shutil.rmtree(run.path / phase, ignore_errors=True)
        run.update(state="done", phase="done", step=total, eta_seconds=0, message=f"vector saved ({vec.nnz:,} entries)")
        say(f"vector saved to {run.vector_dir} after {time.time() - started:.0f} s: {cfg.kind} "
            f"({cfg.language or 'no language'}), {vec.nnz:,} entries ({vec.nnz / n_maskable:.2%} of the maskable "
            "parameters)")
        return run.vector_dir
