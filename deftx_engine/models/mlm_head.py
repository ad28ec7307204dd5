"""A fitted masked-LM head for encoders that ship none, and masked-token scores on held-out text.

Why: a language SFT learns a language through an MLM head. Checkpoints such as multilingual-e5-small or
MiniLM ship no head, and a random one (masked-token loss ln 250002 = 12.4) makes phase 1 spend the encoder
delta on adapting to the head rather than to the language. So before a language SFT of such a base, the
head alone is fitted with the encoder frozen: its decoder is the (frozen) input embedding matrix, and only
the transform and the output bias train. It starts from an informed point -- identity transform, bias =
log unigram frequency of the fitting text, over the decoder's whole vocabulary (multilingual-e5-small's has
250,037 rows for a tokenizer of 250,002) -- and trains until the held-out loss stops falling. Under a run's
bf16 precision the frozen encoder runs in bf16 and the head in float32 (``MaskedLMForSFT.head_logits``). The fitted
head is cached by everything it depends on (base model, layer, text, settings), so every language SFT with
the same inputs starts from the same head, and the fit is paid once. A stopped fit is kept and resumed where
it stopped (ending with the head of a fit never stopped); an entry that fails its checksum, shapes or
finiteness check is named and made again, never loaded.

``layer``: the head may read the hidden states after layer ``layer`` instead of the last one. Contrastively
trained sentence encoders (e5) keep little token identity in their top layers (measured in
benchmarks/RESULTS.md); reading the MLM loss lower leaves the upper layers, which carry the sentence
representation a task vector uses, outside the language SFT.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..method.embedding_rows import mask_tokens
from .e5_small import cache_root
from .precision import Amp

# what a fit made by this code is, in cache keys: 2 since the bias's informed start spans the decoder's whole
# vocabulary (before, a decoder with more rows than the tokenizer has ids started from a random bias)
FIT_VERSION = 2


@dataclass
class HeadFitConfig:
    """How a head is fitted; part of the cache key."""

    max_steps: int = field(default=400, metadata={"help": "most steps of head fitting"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the head fit"})
    batch_size: int = field(default=32, metadata={"help": "sentences per head-fit step"})
    max_length: int = field(default=64, metadata={"help": "tokens per sentence (truncated)"})
    eval_every: int = field(default=50, metadata={"help": "held-out check every N steps"})
    min_gain: float = field(default=0.01, metadata={"help": "stop when the held-out loss falls by less "
                                                            "than this share over one check"})
    seed: int = 0


# ---- scoring ---------------------------------------------------------------------------------
def _batches(tokenizer, lines: Sequence[str], batch_size: int, max_length: int):
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(list(lines[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
        yield enc, special


@torch.no_grad()
def masked_lm_scores(model, tokenizer, lines: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
                     seed: int = 0) -> dict:
    """Masked-token loss and top-1 accuracy of ``model`` (a ``models.MaskedLMForSFT``) on ``lines``, with
    the same masked positions for every model given the same seed (so models compare entry for entry). In
    float32 under any autocast: the evidence compares runs, so it is scored one way."""
    dev = next(model.parameters()).device
    with torch.autocast(dev.type, enabled=False):
        return _masked_lm_scores(model, tokenizer, lines, batch_size, max_length, seed, dev)


def _masked_lm_scores(model, tokenizer, lines: Sequence[str], batch_size: int, max_length: int, seed: int,
                      dev: torch.device) -> dict:
    gen = torch.Generator().manual_seed(seed)
    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for enc, special in _batches(tokenizer, lines, batch_size, max_length):
        ids, labels = mask_tokens(enc["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), gen,
                                  replace=False)
        enc = {k: v.to(dev) for k, v in enc.items()}
        out = model(**{**enc, "input_ids": ids.to(dev)}, labels=labels.to(dev))
        picked = labels[labels != -100].to(dev)
        if picked.numel():
            loss_sum += float(F.cross_entropy(out["logits"].float(), picked, reduction="sum"))
            correct += int((out["logits"].argmax(-1) == picked).sum())
            n += picked.numel()
    model.train(was)
    return {"loss": loss_sum / n if n else float("nan"), "accuracy": correct / n if n else float("nan"), "n": n}


def heldout_report(model, tokenizer, lines: Sequence[str], before: dict, theta0: dict, heads: Sequence[str], *,
                   max_length: int, seed: int) -> dict:
    """Masked-token loss / top-1 on the held-out lines: theta0 (with its fitted head; ``before``, scored so before
    training), theta0 + phi (the whole vector), and theta0 + phi's encoder under theta0's head -- the part that
    composition uses. In float32 whatever the run's precision (``masked_lm_scores``)."""
    after = masked_lm_scores(model, tokenizer, lines, max_length=max_length, seed=seed)
    params = dict(model.named_parameters())
    trained = {n: params[n].detach().clone() for n in heads}
    with torch.no_grad():
        for n in heads:
            params[n].copy_(theta0[n])
        encoder_only = masked_lm_scores(model, tokenizer, lines, max_length=max_length, seed=seed)
        for n in heads:
            params[n].copy_(trained[n])
    summary = (f"held-out masked-token loss on {len(lines)} lines: θ0 {before['loss']:.3f} "
               f"(top-1 {before['accuracy']:.1%}) -> θ0 + φ {after['loss']:.3f} (top-1 {after['accuracy']:.1%});"
               f" encoder of φ with θ0's head {encoder_only['loss']:.3f}")
    return {"lines": len(lines), "theta0": before, "theta0+phi": after, "encoder_only": encoder_only,
            "summary": summary}


# ---- the head ------------------------------------------------------------------------------------------------
def head_parameters(model) -> dict[str, nn.Parameter]:
    """The trainable parameters of the MLM head: not the decoder weight (the frozen input embedding), and
    not its LayerNorm (frozen everywhere, as in LT-SFT)."""
    from ..method.params import parameter_roles

    return {n: p for n, p in model.named_parameters() if n in parameter_roles(model).heads and p.requires_grad}


def _informed_start(model, tokenizer, lines: Sequence[str], max_length: int) -> None:
    """Identity transform and bias = log unigram frequency (add-one smoothed) of the fitting text, over the
    decoder's vocabulary (``config.vocab_size``, which may hold more rows than the tokenizer has ids)."""
    head = getattr(model, model._head_name)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    counts = torch.ones(vocab, dtype=torch.float64)
    for i in range(0, len(lines), 256):
        for ids in tokenizer(list(lines[i:i + 256]), truncation=True, max_length=max_length)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids), minlength=vocab).double()
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear) and module.weight.shape == (hidden, hidden):
                module.weight.copy_(torch.eye(hidden))
                module.bias.zero_()
        for p in head_parameters(model).values():
            if p.ndim == 1 and p.shape[0] == vocab:
                p.copy_((counts / counts.sum()).log().to(p.dtype))


def fit_head(model, tokenizer, train: Sequence[str], heldout: Sequence[str], cfg: HeadFitConfig,
             progress: Callable[[str], None] | None = None, *, stop: Callable[[], bool] | None = None,
             on_step: Callable[[int, int], None] | None = None, resume: dict | None = None,
             amp: Amp | None = None) -> dict:
    """Fit the head of ``model`` in place (encoder frozen); returns the fit's record (steps, losses). ``amp``: the
    steps' precision (the held-out checks are float32 whatever it is).

    ``on_step(step, max_steps)`` after every step (progress for watchers); ``stop()`` is asked after every step,
    and a true answer ends the fit there, as a stop signal ends a training phase: the record says "stopped"
    and holds a "checkpoint" (the head, the optimizer's moments, the random states and the place in the pass).
    ``resume=`` that checkpoint goes on from there, so that a stopped and resumed fit ends with the head of
    one never stopped (given the same global seed before each, as ``train_sft`` sets it)."""
    if not train:
        raise ValueError("fit_head() needs at least one line of text")
    params = head_parameters(model)
    enc_params = [p for n, p in model.named_parameters() if n not in params]
    frozen = [p.requires_grad for p in enc_params]
    for p in enc_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = next(model.parameters()).device
    score = lambda: masked_lm_scores(model, tokenizer, heldout, max_length=cfg.max_length, seed=cfg.seed)  # noqa: E731
    if resume is None:
        _informed_start(model, tokenizer, train, cfg.max_length)
        history, step, position, order, seconds = [{"step": 0, **score()}], 0, 0, [], 0.0
    else:
        history, step, position, seconds = resume["history"], resume["step"], resume["position"], resume["seconds"]
        order = _restore(resume["tensors"], params, opt, gen, dev)
    best = min(h["loss"] for h in history)
    t0 = time.time()
    model.train()
    # whole batches per pass over the text; a text smaller than one batch is one (smaller) batch, so every
    # pass takes at least one step and the loop ends after at most max_steps passes
    per_pass = max(1, len(train) // cfg.batch_size)
    checkpoint, done = None, step >= cfg.max_steps
    while not done and checkpoint is None:
        if position == 0:
            order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(position, per_pass):
            batch = [train[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            enc, special = next(_batches(tokenizer, batch, cfg.batch_size, cfg.max_length))
            ids, labels = mask_tokens(enc["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), gen)
            enc = {k: v.to(dev) for k, v in enc.items()}
            with amp.autocast() if amp else contextlib.nullcontext():
                loss = model(**{**enc, "input_ids": ids.to(dev)}, labels=labels.to(dev))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if on_step:
                on_step(step, cfg.max_steps)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                history.append({"step": step, **score()})
                if progress:
                    progress(f"MLM head fit: step {step}, held-out loss {history[-1]['loss']:.3f}, "
                             f"top-1 {history[-1]['accuracy']:.1%}")
                done = (best - history[-1]["loss"]) / best < cfg.min_gain
                best = min(best, history[-1]["loss"])
            done = done or step >= cfg.max_steps
            if done:
                break
            if stop and stop():  # no held-out check here: a stop must be quick (the app kills after a grace period)
                checkpoint = {"tensors": _snapshot(params, opt, gen, order, dev), "step": step,
                              "position": (i + 1) % per_pass, "history": history,
                              "seconds": seconds + time.time() - t0}
                break
        position = 0
    for p, was in zip(enc_params, frozen):
        p.requires_grad_(was)
    record = {"steps": step, "seconds": seconds + time.time() - t0, "history": history, "heldout": history[-1],
              "config": asdict(cfg), "stopped": checkpoint is not None}
    return {**record, "checkpoint": checkpoint} if checkpoint else record


def _snapshot(params: dict[str, nn.Parameter], opt, gen: torch.Generator, order: list[int], dev) -> dict:
    """What a stopped fit needs to go on exactly: named as ``_snapshot_shapes`` names them."""
    out = {"generator": gen.get_state(), "rng": torch.get_rng_state(), "order": torch.tensor(order, dtype=torch.long)}
    if dev.type == "cuda":  # dropout on the GPU draws from its own generator
        out["cuda_rng"] = torch.cuda.get_rng_state(dev)
    for n, p in params.items():  # a parameter no step reached (a bias the head leaves unused) has AdamW's first state
        state = opt.state[p]
        out.update({f"head.{n}": p.detach(), f"exp_avg.{n}": state.get("exp_avg", torch.zeros_like(p)),
                    f"exp_avg_sq.{n}": state.get("exp_avg_sq", torch.zeros_like(p)),
                    f"step.{n}": state.get("step", torch.tensor(0.0))})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def _snapshot_shapes(params: dict[str, nn.Parameter], n_train: int, dev) -> dict[str, tuple]:
    shapes = {"generator": tuple(torch.Generator().get_state().shape), "rng": tuple(torch.get_rng_state().shape),
              "order": (n_train,)}
    if dev.type == "cuda":
        shapes["cuda_rng"] = tuple(torch.cuda.get_rng_state(dev).shape)
    for n, p in params.items():
        shapes.update({f"head.{n}": tuple(p.shape), f"exp_avg.{n}": tuple(p.shape),
                       f"exp_avg_sq.{n}": tuple(p.shape), f"step.{n}": ()})
    return shapes


def _restore(tensors: dict, params: dict[str, nn.Parameter], opt, gen: torch.Generator, dev) -> list[int]:
    """Put a ``_snapshot`` back (head, optimizer moments, random states); returns the pass's order."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"head.{n}"])
            opt.state[p] = {"step": tensors[f"step.{n}"].clone(),
                            **{k: tensors[f"{k}.{n}"].to(dev, p.dtype) for k in ("exp_avg", "exp_avg_sq")}}
    gen.set_state(tensors["generator"])
    torch.set_rng_state(tensors["rng"])
    if dev.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda_rng"], dev)
    return tensors["order"].tolist()


def split_heldout(lines: Sequence[str], share: float) -> tuple[list[str], list[str]]:
    """Every ``round(1/share)``-th line is held out (deterministic, spread over the corpus)."""
    if share <= 0 or len(lines) < 20:
        return list(lines), []
    every = max(2, round(1 / share))
    return ([l for i, l in enumerate(lines) if i % every != every - 1],
            [l for i, l in enumerate(lines) if i % every == every - 1])


# ---- the cache: <key>.safetensors + <key>.json per entry, each checked when read --------------------------------
class _Damaged(Exception):
    """A cache entry that is unreadable or fails a check (the message says which)."""


def _digest(data: bytes, record: dict) -> str:
    """Checksum of an entry: its tensors' bytes and its record (but this field), so neither can change alone."""
    text = json.dumps({k: v for k, v in record.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(data + text.encode()).hexdigest()


def _read_entry(stem: Path, shapes: dict[str, tuple]) -> tuple[dict, dict] | None:
    """The tensors and record of the entry ``stem``, or None if there is none. ``_Damaged`` unless both files
    read, the checksum matches, the tensors are exactly ``shapes`` and every float in them is finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    weights, record_file = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    if not (weights.exists() or record_file.exists()):
        return None
    try:
        data = weights.read_bytes()
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise _Damaged("its record is not a JSON object")
        # an entry written before checksums (no sha256) is trusted only as far as the checks below go
        if "sha256" in record and record["sha256"] != _digest(data, record):
            raise _Damaged("its checksum does not match")
        tensors = load(data)
    except (OSError, ValueError, RecursionError, SafetensorError) as e:  # (JSON and UTF-8 errors are ValueErrors)
        raise _Damaged(f"unreadable: {e}") from None
    have = {n: tuple(t.shape) for n, t in tensors.items()}
    if have != shapes:
        wrong = sorted(set(have) ^ set(shapes)) or sorted(n for n in have if have[n] != shapes[n])
        raise _Damaged(f"its tensors are not those of this head ({', '.join(wrong[:3])})")
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise _Damaged("it holds NaN or infinite values")
    return tensors, record


def _load(stem: Path, shapes: dict[str, tuple], what: str, progress: Callable[[str], None] | None):
    """``_read_entry``, with a damaged entry named in the log and read as none (it is then made again)."""
    try:
        return _read_entry(stem, shapes)
    except _Damaged as e:
        if progress:
            progress(f"{what} {stem}.safetensors is damaged ({e}); it is not used")
        return None


def _store(stem: Path, tensors: dict, record: dict, progress: Callable[[str], None] | None) -> None:
    """Write an entry (tensors, then the record with their checksum: an entry cut short fails its check). A cache
    it cannot write costs a refit next time, never the run."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes

    data = save({n: t.detach().cpu().contiguous() for n, t in tensors.items()})
    try:
        atomic_write_bytes(stem.with_name(stem.name + ".safetensors"), data)
        atomic_write_bytes(stem.with_name(stem.name + ".json"),
                           json.dumps({**record, "sha256": _digest(data, record)}).encode())
    except OSError as e:
        if progress:
            progress(f"could not cache the MLM head in {stem.parent} ({e.strerror or e}); set DEFTX_CACHE")


def weights_key(model, name: str) -> str:
    """Identifies a base model's weights (not only its shapes) for caches: name + a sample of each tensor."""
    h = hashlib.sha256(name.encode())
    for n, p in model.named_parameters():
        if n.startswith(model.base_model_prefix + "."):
            h.update(n.encode() + p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cached_fit(model, tokenizer, base_key: str, lines: Sequence[str], cfg: HeadFitConfig,
               progress: Callable[[str], None] | None = None, *, stop: Callable[[], bool] | None = None,
               on_step: Callable[[int, int], None] | None = None, amp: Amp | None = None) -> dict:
    """Load the head fitted for these inputs from the cache, or fit and cache it (in ``amp``'s precision, part of
    the key). Returns its record. A fit ended by ``stop`` is kept in the cache as ``<key>.partial`` (``fit_head``'s
    checkpoint), and the next fit of the same inputs goes on from there; a damaged entry is named (``progress``)
    and made again."""
    precision = amp.name if amp else "fp32"
    text_hash = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([base_key, getattr(model, "mlm_layer", None), text_hash, asdict(cfg),
                                     FIT_VERSION, precision],
                                    sort_keys=True).encode()).hexdigest()[:16]
    entry = cache_root() / "heads" / key
    partial = entry.with_name(f"{key}.partial")
    params = head_parameters(model)
    dev = next(model.parameters()).device
    cached = _load(entry, {n: tuple(p.shape) for n, p in params.items()}, "the cached MLM head", progress)
    if cached:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(cached[0][n])
        if "sha256" not in cached[1]:  # an older version's entry: from now on with its checksum
            _store(entry, cached[0], cached[1], progress)
        return {**cached[1], "cached": True}
    train, heldout = split_heldout(lines, 0.1)
    kept = _load(partial, _snapshot_shapes(params, len(train), dev), "the stopped MLM head fit", progress)
    if kept and progress:
        progress(f"MLM head fit resumed at step {kept[1]['step']} from {partial}.safetensors")
    record = fit_head(model, tokenizer, train, heldout or train[: cfg.batch_size], cfg, progress, stop=stop,
                      on_step=on_step, resume={**kept[1], "tensors": kept[0]} if kept else None, amp=amp)
    if record["stopped"]:
        checkpoint = record.pop("checkpoint")
        _store(partial, checkpoint.pop("tensors"), checkpoint, progress)
        return {**record, "cached": False}
    record.update(layer=getattr(model, "mlm_layer", None), text_sha256=text_hash, n_lines=len(lines),
                  precision=precision)
    _store(entry, params, record, progress)
    for leftover in (partial.with_name(partial.name + ".safetensors"), partial.with_name(partial.name + ".json")):
        with contextlib.suppress(OSError):
            leftover.unlink(missing_ok=True)
    return {**record, "cached": False}
