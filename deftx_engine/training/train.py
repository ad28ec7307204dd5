"""The two-phase SFT trainer: full fine-tune -> (denoise) -> global top-k mask -> reset -> sparse fine-tune.

Built on Hugging Face ``Trainer``, so both phases get logging, gradient accumulation, mixed precision on a
GPU, checkpoints/resume and multi-process training under ``torchrun`` / ``accelerate launch``.
Progress goes to the run folder (``runs.RunDir``, written by ``progress.py``), which is all the web app reads.
``train_sft`` reads top to bottom as its phases, each a function of the run's state (``_Job``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..errors import ConfigError
from ..fileio import atomic_write_bytes, write_json_atomic
from ..method.denoise import choose_mask
from ..method.embedding_rows import MLMCollator, train_rows_only, used_rows
from ..method.masks import Mask, k_from
from ..method.optim import SparseAdamW
from ..method.params import ParameterRoles, parameter_roles, restrict, trainable_setup
from ..method.vector_meta import HeadFit
from ..method.vectors import SparseVector, VectorMeta, base_fingerprint
from ..models.loading import load_cls_model, load_mlm_model, load_tokenizer, max_positions
from ..models.mlm_head import HeadFitConfig, cached_fit, heldout_report, masked_lm_scores, split_heldout, weights_key
from ..models.precision import Amp
from ..models.precision import resolve as resolve_precision
from .config import TrainConfig
from .data import load_corpus, load_task_data
from .phase1 import load_deltas, save_deltas
from .progress import head_fit_progress, progress_callback, run_logger
from .runs import RunDir, StopFlag, read_json


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
        dataloader_num_workers=0, disable_tqdm=True,  # our own bar names the phase (progress.py)
        ddp_find_unused_parameters=cfg.kind == "language",  # MLM heads carry a bias the loss may not use
        max_grad_norm=0.0 if sparse else 1.0,  # the sparse optimizer clips masked grads itself
    )


def _run_phase(job: _Job, phase: str, optimizer=None) -> bool:
    """Train phase "full" or "sparse" with ``Trainer``; False if a stop ended it early (a checkpoint was saved)."""
    from transformers import Trainer

    sparse = phase == "sparse"
    out = job.run.path / ("phase2" if sparse else "phase1")
    steps, offset = (job.sparse, job.full) if sparse else (job.full, 0)
    args = training_arguments(job.cfg, out, steps, job.amp, sparse=optimizer is not None)
    from transformers.trainer_callback import PrinterCallback

    trainer = Trainer(model=job.model, args=args, train_dataset=job.dataset, data_collator=job.collator,
                      optimizers=(optimizer, None),
                      callbacks=[progress_callback(job.run, phase, offset, job.full + job.sparse, job.stop)])
    trainer.remove_callback(PrinterCallback)  # raw loss dicts: the bar and metrics.jsonl carry them
    trainer.train(resume_from_checkpoint=_last_checkpoint(out) if job.resume else None)
    return not job.stop


# ---- train_sft, phase by phase -----------------------------------------------------------------------------
@dataclass
class _Job:
    """One ``train_sft`` run: what its phases read. ``_prepare`` loads and checks it; the phases fill in the rest."""

    cfg: TrainConfig
    run: RunDir
    stop: StopFlag | None
    main: bool  # rank 0: the only process that writes the run folder
    tokenizer: object
    dataset: _Examples
    label_names: list[str] | None
    model: nn.Module
    params: dict[str, nn.Parameter]
    roles: ParameterRoles
    amp: Amp
    n_maskable: int
    k: int
    fits_head: bool
    head_text: list[str] | None
    resume: bool = False
    say: Callable[[str], None] = print  # resume and say: set once the run folder is claimed
    heads: list[str] = field(default_factory=list)  # the heads that train (a frozen one stays out of the vector)
    theta0: dict[str, torch.Tensor] = field(default_factory=dict)
    full: int = 0  # phase-1 steps
    sparse: int = 0  # phase-2 steps
    rows: torch.Tensor | None = None  # the word-embedding rows the data uses
    collator: object = None


def _prepare(cfg: TrainConfig, run: RunDir, stop: StopFlag | None) -> _Job:
    """Read the data, load the model and check the settings against it: all before the run folder is claimed."""
    from transformers import set_seed

    main = int(os.environ.get("RANK", "0")) == 0
    tokenizer = load_tokenizer(cfg.base_model)
    dataset, label_names = load_examples(cfg, tokenizer)
    set_seed(cfg.seed)
    model = (load_mlm_model(cfg.base_model, cfg.mlm_layer) if cfg.kind == "language"
             else load_cls_model(cfg.base_model, label_names))
    amp = resolve_precision(cfg.precision)
    positions = max_positions(model, tokenizer)
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
    return _Job(cfg, run, stop, main, tokenizer, dataset, label_names, model, params, roles, amp, n_maskable, k,
                fits_head, head_text)


def _fit_head(job: _Job) -> dict | None:
    """The MLM head of a base that ships none, fitted once per base model and text (``mlm_head.cached_fit``);
    None when no head is fitted. A stop signal ends the fit with its progress kept (``["stopped"]``)."""
    if not job.fits_head:
        return None
    cfg, run, say = job.cfg, job.run, job.say
    if job.main:
        run.update(state="running", phase="head-fit", message="fitting the MLM head (once per base model "
                                                              "and text; cached)")
    head_fit = cached_fit(job.model, job.tokenizer, weights_key(job.model, cfg.base_model),
                          job.head_text or job.dataset.lines, HeadFitConfig(max_length=cfg.max_length), progress=say,
                          stop=lambda: bool(job.stop), on_step=head_fit_progress(run) if job.main else None,
                          amp=job.amp)
    if head_fit["stopped"]:
        if job.main:
            run.update(step=head_fit["steps"])
        say(f"MLM head fit stopped by a signal at step {head_fit['steps']}; kept: the next run on this "
            "base model and text goes on from there")
    else:
        say(f"MLM head {'loaded from the cache' if head_fit['cached'] else 'fitted'}: held-out loss "
            f"{head_fit['heldout']['loss']:.3f}, top-1 {head_fit['heldout']['accuracy']:.1%}")
    return head_fit


def _take_theta0(job: _Job) -> dict | None:
    """Keep theta0 (a fitted head is theta0's); return its held-out masked-token scores (language SFTs)."""
    job.theta0 = {n: job.params[n].detach().clone() for n in job.roles.maskable + job.heads}
    lines, cfg = job.dataset.heldout, job.cfg
    if cfg.kind != "language" or not lines:
        return None
    return masked_lm_scores(job.model, job.tokenizer, lines, max_length=cfg.max_length, seed=cfg.seed)


def _plan(job: _Job) -> None:
    """The steps of each phase and the batches' collator; told to the log and the status."""
    cfg = job.cfg
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    job.full, job.sparse = cfg.planned_steps(len(job.dataset), world)
    job.rows = used_rows(job.dataset.rows, job.tokenizer)
    job.collator = data_collator(cfg, job.tokenizer, job.rows)
    k, n = job.k, job.n_maskable
    job.say(f"{cfg.kind} SFT of {cfg.base_model}: {len(job.dataset)} examples, k = {k:,} of {n:,} maskable "
            f"({k / n:.2%}), {job.full} full + {job.sparse} sparse steps, method {cfg.method}")
    if job.main:
        job.run.update(state="running", phase="full", step=0, total_steps=job.full + job.sparse, message="")


def _phase1(job: _Job, phase1_cache: str | Path | None) -> dict[str, torch.Tensor] | None:
    """Phase 1, full fine-tuning, or its delta read from ``phase1_cache``: the maskable parameters' deltas (the heads
    keep their phase-1 values), or None if a stop signal ended it (a checkpoint was saved)."""
    cfg, params = job.cfg, job.params
    # the heads' phase-1 delta too: without a sparse phase the vector keeps the phase-1 heads
    shapes = {n: params[n].shape for n in job.roles.maskable + job.heads}
    deltas = load_deltas(phase1_cache, cfg.phase1_settings(), shapes) if phase1_cache else None
    if deltas is not None:
        with torch.no_grad():
            for n in job.heads:
                params[n].copy_(job.theta0[n] + deltas.pop(n).to(params[n].dtype))
        job.say(f"phase 1 reused: its delta read from {phase1_cache}")
        return deltas
    trainable_setup(job.model, job.roles, None)
    with _rows_only(job.model, job.roles, cfg, job.rows):
        finished = _run_phase(job, "full")
    if not finished:
        return None
    deltas = {n: params[n].detach().float() - job.theta0[n].float() for n in shapes}
    if phase1_cache and job.main:
        save_deltas(phase1_cache, deltas, cfg.phase1_settings())
    for n in job.heads:
        del deltas[n]
    return deltas


def _mask_from(job: _Job, deltas: dict[str, torch.Tensor]) -> Mask:
    """The mask of the phase-1 delta (``denoise.choose_mask``), written to the run folder with the spectra. Without
    a sparse phase (the ablation) the model keeps the masked phase-1 (denoised) delta: no retraining."""
    cfg, run = job.cfg, job.run
    if job.main:
        run.update(phase="denoise", step=job.full, message="denoising and selecting the mask")
    t = time.time()
    mask, records = choose_mask(deltas, job.k, cfg.denoise_config() if cfg.method == "deftx" else None)
    if job.main:
        if cfg.method == "deftx":
            write_json_atomic(run.spectra_file, {n: asdict(r) for n, r in records.items()})
        atomic_write_bytes(run.mask_file, save({n: i.to(torch.int32).contiguous() for n, i in mask.items()}))
    job.say(f"mask of {job.k:,} entries chosen in {time.time() - t:.1f}s")
    if not cfg.sparse_phase:  # ablation: keep the masked phase-1 (denoised) delta, no retraining
        with torch.no_grad():
            for n in job.roles.maskable:
                flat = job.params[n].data.view(-1)
                flat.copy_(job.theta0[n].view(-1))
                flat[mask[n]] += deltas[n].view(-1)[mask[n]].to(flat.dtype)
    return mask


def _phase1_mask(job: _Job, phase1_cache: str | Path | None) -> Mask | None:
    """Phase 1 and the mask chosen from its delta, unless a mask from an earlier attempt exists and a sparse phase
    follows (without one, the vector is the masked phase-1 delta: phase 1 resumes from its last checkpoint).
    None if a stop signal ended phase 1."""
    if job.resume and job.cfg.sparse_phase and job.run.mask_file.exists():
        mask = {n: t.long() for n, t in load_file(str(job.run.mask_file)).items()}
        job.say("resumed: mask found, phase 1 skipped")
        return mask
    deltas = _phase1(job, phase1_cache)
    return None if deltas is None else _mask_from(job, deltas)


def _phase2(job: _Job, mask: Mask) -> bool:
    """Phase 2: reset to theta0, train only the masked entries (and the heads, densely); False if stopped."""
    params, cfg = job.params, job.cfg
    with torch.no_grad():
        for n, t0 in job.theta0.items():
            params[n].data.copy_(t0)
    trainable_setup(job.model, job.roles, mask)
    opt = SparseAdamW([(params[n], mask[n]) for n in job.roles.maskable if params[n].requires_grad] +
                      [(params[n], None) for n in job.heads], lr=cfg.lr, weight_decay=cfg.weight_decay)
    finished = _run_phase(job, "sparse", optimizer=opt)
    if finished:
        job.say(f"sparse phase optimizer state: {opt.state_bytes():,} bytes")
    return finished


def _heldout_check(job: _Job, before: dict | None) -> dict | None:
    """Did the language SFT learn its language? The held-out report (``mlm_head.heldout_report``), logged."""
    if before is None:
        return None
    heldout = heldout_report(job.model, job.tokenizer, job.dataset.heldout, before, job.theta0, job.heads,
                             max_length=job.cfg.max_length, seed=job.cfg.seed)
    job.run.log_metrics({"phase": "heldout", **heldout})
    job.say(heldout["summary"])
    return heldout


def _save_vector(job: _Job, mask: Mask, heldout: dict | None, head_fit: dict | None, started: float,
                 keep_checkpoints: bool) -> Path:
    """theta1 - theta0 on the mask (and the trained heads) as the run's vector; the phase checkpoints go."""
    cfg, run, total, n_maskable = job.cfg, job.run, job.full + job.sparse, job.n_maskable
    run.update(phase="save", step=total, message="saving the vector")
    meta = VectorMeta(kind=cfg.kind, base_model=cfg.base_model, base_fingerprint=base_fingerprint(job.model),
                      language=cfg.language, label_names=list(job.label_names or []),
                      method=cfg.method if cfg.sparse_phase else f"{cfg.method}-no-retrain",
                      denoise=cfg.denoise_config().to_dict() if cfg.method == "deftx" else None,
                      train=cfg.to_dict(), n_maskable=n_maskable, heldout_mlm=heldout or None,
                      mlm_head=HeadFit(**{k: head_fit[k] for k in ("heldout", "steps", "layer", "n_lines")})
                      if head_fit else None)
    vec = SparseVector.from_diff(meta, job.theta0, job.model, mask, job.heads)
    vec.save(run.vector_dir)
    if not keep_checkpoints:
        for phase in ("phase1", "phase2"):
            shutil.rmtree(run.path / phase, ignore_errors=True)
    run.update(state="done", phase="done", step=total, eta_seconds=0, message=f"vector saved ({vec.nnz:,} entries)")
    job.say(f"vector saved to {run.vector_dir} after {time.time() - started:.0f} s: {cfg.kind} "
            f"({cfg.language or 'no language'}), {vec.nnz:,} entries ({vec.nnz / n_maskable:.2%} of the maskable "
            "parameters)")
    return run.vector_dir


def train_sft(cfg: TrainConfig, run: RunDir, *, stop: StopFlag | None = None, resume: bool = False,
              overwrite: bool = False, keep_checkpoints: bool = False,
              phase1_cache: str | Path | None = None) -> Path | None:
    """Run both phases and save the vector to ``run.vector_dir``; returns None if stopped by a signal.

    Once the vector is saved the phase checkpoints (hundreds of MB) are deleted unless ``keep_checkpoints``.
    ``phase1_cache``: a file for the phase-1 delta, read if it exists (phase 1 is skipped), else written
    after phase 1 -- key it by ``cfg.phase1_settings()`` so that only runs sharing phase 1 share the file.

    Data, settings and the output folder are all checked before the folder is claimed or a model loaded.
    """
    started = time.time()
    job = _prepare(cfg, run, stop)
    if job.main:  # everything is checked: only now is the output folder claimed
        resume = run.claim(cfg.to_dict(), resume=resume, overwrite=overwrite)
    job.resume = resume
    with run.writing(), run.record_failure(job.main):  # any error from here on marks the run failed (with its message)
        job.say = run_logger(run, job.main)
        job.say(f"precision: {job.amp.why}")
        if job.main:
            run.update(precision=job.amp.name)
        job.heads = [n for n in job.roles.heads if job.params[n].requires_grad]
        head_fit = _fit_head(job)
        if head_fit is not None and head_fit["stopped"]:
            return None
        before = _take_theta0(job)
        _plan(job)
        mask = _phase1_mask(job, phase1_cache)
        if mask is None or (cfg.sparse_phase and not _phase2(job, mask)):
            return None
        if not job.main:
            return run.vector_dir
        return _save_vector(job, mask, _heldout_check(job, before), head_fit, started, keep_checkpoints)
