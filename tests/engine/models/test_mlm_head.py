"""The fitted MLM head: masking, scoring, the fit (stop and resume included) and its cache, on a tiny model."""
import contextlib
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM, BertTokenizer

from deftx_engine.method.embedding_rows import mask_tokens
from deftx_engine.models import mlm_head, precision
from deftx_engine.models.loading import MaskedLMForSFT
from deftx_engine.models.mlm_head import (
    HeadFitConfig,
    cached_fit,
    fit_head,
    head_parameters,
    split_heldout,
)
from tiny import ASSETS, tiny_bert_config

LINES = (ASSETS / "target_corpus_id.txt").read_text(encoding="utf-8").splitlines()[:40]  # 36 fit, 4 held out
# 3 batches a pass; no early end, so that every fit runs its max_steps
CFG = HeadFitConfig(max_steps=6, batch_size=12, max_length=16, eval_every=2, min_gain=-1e9)


WORDS = sorted({w for line in LINES for w in line.lower().split()})
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # (not the hidden size: rows and columns differ)


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def build_model(seed: int = 0, extra_rows: int = 0):
    """A tiny masked-LM model with a new head, shaped as ``models.load_mlm_model`` makes it (decoder = a frozen copy
    of the input embeddings), built in-process: no files, milliseconds. ``extra_rows``: embedding rows beyond the
    tokenizer's ids (multilingual-e5-small has 35)."""
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(tiny_bert_config(vocab_size=len(VOCAB) + extra_rows))
    out = mlm.get_output_embeddings()
    out.weight = torch.nn.Parameter(mlm.get_input_embeddings().weight.detach().clone(), requires_grad=False)
    out.bias = torch.nn.Parameter(out.bias.detach().clone())  # untied from the head's own (unused) bias, as loaded
    return MaskedLMForSFT(mlm, None, head_is_new=True)


@pytest.fixture
def new_model():
    """A fresh model with its new (random) head each call, the same each time."""
    return build_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "heads"


def head(model) -> dict:
    return {n: p.detach().clone() for n, p in head_parameters(model).items()}


def same_head(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def fit_cached(model, tokenizer, log=None, **kw) -> dict:
    torch.manual_seed(0)  # as train_sft's set_seed: the encoder's dropout draws from the global generator
    return cached_fit(model, tokenizer, "tiny", LINES, CFG, progress=log.append if log is not None else None, **kw)


def entry(cache: Path) -> tuple[Path, Path]:
    weights = [p for p in cache.glob("*.safetensors") if ".partial" not in p.name]
    assert len(weights) == 1, weights
    return weights[0], weights[0].with_suffix(".json")


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` as a cache nobody may write: chmod, or for root (whom chmod does not stop) chattr +i."""
    folder.chmod(0o500)
    immutable = False
    try:
        if os.access(folder, os.W_OK):
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("root without chattr: no way to make a folder read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o700)


# ---- the cache ------------------------------------------------------------------------------------------------
@pytest.fixture
def fitted(new_model, tokenizer, cache):
    """A head fitted and cached: (its parameters, its record)."""
    model = new_model()
    record = fit_cached(model, tokenizer)
    assert not record["cached"] and not record["stopped"] and record["steps"] == CFG.max_steps
    return head(model), record


def test_a_cached_head_is_loaded_with_its_record(fitted, new_model, tokenizer, cache):
    record_file = entry(cache)[1]  # reformatted (keys sorted, indented) by some JSON tool: the same record
    record_file.write_text(json.dumps(json.loads(record_file.read_text()), sort_keys=True, indent=1))
    fresh, log = new_model(), []
    record = fit_cached(fresh, tokenizer, log)
    assert record["cached"] and same_head(head(fresh), fitted[0]) and log == []
    assert {k: record[k] for k in ("steps", "heldout", "history")} == \
        {k: fitted[1][k] for k in ("steps", "heldout", "history")}
    assert record["n_lines"] == 40 and record["layer"] is None


def _forge(weights: Path, record_file: Path, tensors: dict) -> None:
    """Replace the entry's tensors and give the record a matching checksum (a damage the checksum cannot see)."""
    save_file(tensors, str(weights))
    record = json.loads(record_file.read_text())
    record["sha256"] = mlm_head._digest(weights.read_bytes(), record)
    record_file.write_text(json.dumps(record))


def _damage(kind: str, weights: Path, record_file: Path) -> None:
    state = load_file(str(weights))
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage":
        weights.write_bytes(os.urandom(weights.stat().st_size))
    elif kind == "nan":  # same names and shapes, NaN values, the old record (the case)
        save_file({n: torch.full_like(t, float("nan")) for n, t in state.items()}, str(weights))
    elif kind == "nan, checksum matching":
        _forge(weights, record_file, {**state, next(iter(state)): torch.full_like(next(iter(state.values())),
                                                                                  float("inf"))})
    elif kind == "wrong shapes, checksum matching":
        _forge(weights, record_file, {n: t[..., :-1].contiguous() if t.ndim else t for n, t in state.items()})
    elif kind == "a tensor missing, checksum matching":
        _forge(weights, record_file, dict(list(state.items())[1:]))
    elif kind == "record garbage":
        record_file.write_bytes(b"\xff{ not json")
    elif kind == "record a list":
        record_file.write_text("[]")
    elif kind == "record edited":  # a loss changed, the weights not
        record = json.loads(record_file.read_text())
        record["history"][0]["loss"] = 0.001
        record_file.write_text(json.dumps(record))
    elif kind == "record missing":
        record_file.unlink()
    elif kind.endswith("record of an older version"):  # no checksum at all
        if kind.startswith("nan"):
            save_file({n: torch.full_like(t, float("nan")) for n, t in state.items()}, str(weights))
        record = json.loads(record_file.read_text())
        del record["sha256"]
        record_file.write_text(json.dumps(record))
    else:
        raise AssertionError(kind)


DAMAGES = ["truncated", "garbage", "nan", "nan, checksum matching", "wrong shapes, checksum matching",
           "a tensor missing, checksum matching", "record garbage", "record a list", "record edited",
           "record missing", "nan, record of an older version"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_cached_head_is_named_and_fitted_again(fitted, new_model, tokenizer, cache, kind):
    weights, record_file = entry(cache)
    _damage(kind, weights, record_file)
    model, log = new_model(), []
    record = fit_cached(model, tokenizer, log)
    assert not record["cached"] and record["steps"] == CFG.max_steps
    assert any(f"{weights} is damaged" in line for line in log), log
    assert same_head(head(model), fitted[0])  # the same fit again, not the damaged values
    again = new_model()
    assert fit_cached(again, tokenizer)["cached"] and same_head(head(again), fitted[0])  # the entry is whole again


def test_an_older_version_s_entry_that_passes_the_checks_is_loaded_and_given_a_checksum(fitted, new_model,
                                                                                        tokenizer, cache):
    weights, record_file = entry(cache)
    _damage("record of an older version", weights, record_file)
    model, log = new_model(), []
    record = fit_cached(model, tokenizer, log)
    assert record["cached"] and same_head(head(model), fitted[0]) and log == []
    upgraded = json.loads(record_file.read_text())
    assert upgraded["sha256"] == mlm_head._digest(weights.read_bytes(), upgraded)
    assert fit_cached(new_model(), tokenizer)["cached"]


def test_a_read_only_cache_costs_a_refit_never_the_run(new_model, tokenizer, cache):
    cache.mkdir(parents=True)
    with read_only(cache):
        model, log = new_model(), []
        record = fit_cached(model, tokenizer, log)
        assert not record["cached"] and record["steps"] == CFG.max_steps
        assert any(f"could not cache the MLM head in {cache}" in line for line in log), log
        assert list(cache.iterdir()) == []
        stopped = fit_cached(new_model(), tokenizer, log, stop=lambda: True)  # a stop it cannot keep either
        assert stopped["stopped"] and stopped["steps"] == 1 and list(cache.iterdir()) == []


def test_a_damaged_entry_in_a_read_only_cache_is_named_and_the_run_goes_on(fitted, new_model, tokenizer, cache):
    weights, record_file = entry(cache)
    _damage("truncated", weights, record_file)
    with read_only(cache):
        model, log = new_model(), []
        record = fit_cached(model, tokenizer, log)
    assert not record["cached"] and same_head(head(model), fitted[0])
    assert any("is damaged" in line for line in log) and any("could not cache" in line for line in log)


# ---- stop and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [1, 2, 3, 4])  # in a pass, at its end (3 batches a pass), at a held-out check
def test_a_stopped_fit_is_kept_and_resumes_to_the_head_of_an_unstopped_one(fitted, new_model, tokenizer, cache,
                                                                            tmp_path, monkeypatch, stop_at):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "other"))
    other = tmp_path / "other" / "heads"
    steps = []
    model = new_model()
    record = fit_cached(model, tokenizer, on_step=lambda s, n: steps.append((s, n)), stop=lambda: len(steps) >= stop_at)
    assert record["stopped"] and not record["cached"] and record["steps"] == stop_at and "checkpoint" not in record
    assert steps == [(s, CFG.max_steps) for s in range(1, stop_at + 1)]
    assert sorted(p.name.split(".", 1)[1] for p in other.iterdir()) == ["partial.json", "partial.safetensors"]
    assert record["history"] == [h for h in fitted[1]["history"] if h["step"] <= stop_at]

    log, steps = [], []
    torch.manual_seed(123)  # (fit_cached seeds 0 again: the resumed fit restores the generator of the stop)
    model = new_model()
    resumed = fit_cached(model, tokenizer, log, on_step=lambda s, n: steps.append(s))
    assert any(f"resumed at step {stop_at} from {other}" in line for line in log), log
    assert steps == list(range(stop_at + 1, CFG.max_steps + 1))
    assert not resumed["stopped"] and same_head(head(model), fitted[0])
    assert resumed["history"] == fitted[1]["history"] and resumed["steps"] == CFG.max_steps
    assert sorted(p.name.split(".", 1)[1] for p in other.iterdir()) == ["json", "safetensors"]  # partial gone
    assert fit_cached(new_model(), tokenizer)["cached"]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "record edited", "wrong shapes, checksum matching"])
def test_a_damaged_partial_fit_is_named_and_the_fit_starts_afresh(fitted, new_model, tokenizer, tmp_path,
                                                                  monkeypatch, kind):
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "other"))
    other = tmp_path / "other" / "heads"
    assert fit_cached(new_model(), tokenizer, stop=lambda: True)["stopped"]
    weights = next(other.glob("*.partial.safetensors"))
    _damage(kind, weights, weights.with_suffix(".json"))
    model, log = new_model(), []
    record = fit_cached(model, tokenizer, log)
    assert any(f"{weights} is damaged" in line for line in log) and not any("resumed" in line for line in log)
    assert not record["stopped"] and same_head(head(model), fitted[0])


# ---- masking ---------------------------------------------------------------------------------------------------
def _batch(rows=64, cols=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 1000, (rows, cols), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    return ids, special


def _parts(ids, new, labels):
    target = labels != -100
    return target, new[target] == 4, new[target] == ids[target]


def test_mask_tokens_defaults_to_15_percent_bert_masking_with_an_integer_vocabulary():
    ids, special = _batch()
    new, labels = mask_tokens(ids, special, 4, 50, torch.Generator().manual_seed(0))
    target, masked, kept = _parts(ids, new, labels)
    assert not (target & special).any() and torch.equal(labels[target], ids[target])
    assert torch.equal(new[~target], ids[~target])
    assert 0.12 < target.sum() / (~special).sum() < 0.18
    replaced = ~masked & ~kept
    assert 0.7 < masked.float().mean() < 0.9 and 0.04 < kept.float().mean() < 0.16
    assert replaced.any() and (new[target][replaced] < 50).all()  # drawn from range(50), far from the ids


def test_mask_tokens_for_scoring_masks_every_target_and_nothing_else():
    ids, special = _batch()
    new, labels = mask_tokens(ids, special, 4, 50, torch.Generator().manual_seed(0), 0.5, replace=False)
    target = labels != -100
    assert 0.45 < target.sum() / (~special).sum() < 0.55 and not (target & special).any()
    assert (new[target] == 4).all() and torch.equal(new[~target], ids[~target])


def test_mask_tokens_draws_from_its_generator_only():
    ids, special = _batch()
    runs = []
    for global_seed, seed in ((0, 7), (1, 7), (0, 8)):
        torch.manual_seed(global_seed)
        for vocab in (50, torch.arange(10, 20)):
            runs.append(mask_tokens(ids, special, 4, vocab, torch.Generator().manual_seed(seed), 0.5))
    for a, b in zip(runs[0:2], runs[2:4]):  # the same generator seed: the same masking, whatever the global seed
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(runs[0:2], runs[4:6]):
        assert not torch.equal(a[1], b[1])


def test_mask_tokens_with_a_set_of_ids_draws_from_it_and_an_empty_set_keeps_the_token():
    ids, special = _batch()
    new, labels = mask_tokens(ids, special, 4, torch.tensor([7, 9]), torch.Generator().manual_seed(0), 0.5)
    target, masked, kept = _parts(ids, new, labels)
    replaced = ~masked & ~kept
    assert replaced.sum() > 50 and set(new[target][replaced].tolist()) == {7, 9}
    new, labels = mask_tokens(ids, special, 4, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(0),
                              0.5)
    target, masked, kept = _parts(ids, new, labels)
    assert (masked | kept).all() and 0.15 < kept.float().mean() < 0.25  # the random 10 % stay as they were


# ---- batches, scores, the head's parameters and its start ---------------------------------------------------------
def test_batches_cover_the_lines_in_order_with_specials_and_padding_marked(tokenizer):
    lines = LINES[3:8]  # 12, 10, 9, 10 and 10 tokens
    batches = list(mlm_head._batches(tokenizer, lines, 2, 11))
    assert [len(enc["input_ids"]) for enc, _ in batches] == [2, 2, 1]
    for k, (enc, special) in enumerate(batches):
        assert "special_tokens_mask" not in enc and enc["input_ids"].shape[1] <= 11
        want = tokenizer(lines[2 * k:2 * k + 2], truncation=True, max_length=11, padding=True)["input_ids"]
        assert enc["input_ids"].tolist() == want
        ids = enc["input_ids"]
        assert torch.equal(special, (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id) |
                           (ids == tokenizer.pad_token_id))
    assert any((enc["attention_mask"] == 0).any() for enc, _ in batches)  # padding is there, and marked above
    assert max(enc["input_ids"].shape[1] for enc, _ in batches) == 11  # truncated


class Oracle(torch.nn.Module):
    """A stand-in model: right at every even target, wrong (a fixed logit margin) at every odd one; it records
    what it was given."""

    def __init__(self, vocab: int):
        super().__init__()
        self.p, self.vocab, self.calls = torch.nn.Parameter(torch.zeros(1)), vocab, []

    def forward(self, input_ids, attention_mask, token_type_ids, labels):
        self.calls.append((input_ids.clone(), labels.clone(), self.training))
        gold = labels[labels != -100]
        guess = torch.where(torch.arange(len(gold)) % 2 == 0, gold, (gold + 1) % self.vocab)
        return {"logits": F.one_hot(guess, self.vocab).float() * 3.0}


def test_masked_lm_scores_against_a_model_of_known_answers(tokenizer):
    oracle = Oracle(len(tokenizer)).train()
    res = mlm_head.masked_lm_scores(oracle, tokenizer, LINES[:10], batch_size=4, max_length=12, seed=3)
    assert oracle.training and [c[2] for c in oracle.calls] == [False] * 3  # scored in eval mode, then restored
    assert [len(c[0]) for c in oracle.calls] == [4, 4, 2] and max(c[0].shape[1] for c in oracle.calls) <= 12
    per_batch = [int((c[1] != -100).sum()) for c in oracle.calls]
    n = sum(per_batch)
    right = sum((k + 1) // 2 for k in per_batch)  # the even targets of each batch
    p_right = torch.tensor(3.0).exp() / (torch.tensor(3.0).exp() + len(tokenizer) - 1)
    p_wrong = 1 / (torch.tensor(3.0).exp() + len(tokenizer) - 1)
    loss = -(right * p_right.log() + (n - right) * p_wrong.log()) / n
    assert res["n"] == n > 10 and res["accuracy"] == right / n and abs(res["loss"] - float(loss)) < 1e-5
    for ids, labels, _ in oracle.calls:  # every target masked, nothing else
        assert (ids[labels != -100] == tokenizer.mask_token_id).all() and not (ids[labels == -100] == 4).any()
    first = [c[1] for c in oracle.calls]
    oracle.calls.clear()
    oracle.eval()
    assert mlm_head.masked_lm_scores(oracle, tokenizer, LINES[:10], batch_size=4, max_length=12, seed=3) == res
    assert not oracle.training and all(torch.equal(a, c[1]) for a, c in zip(first, oracle.calls))
    oracle.calls.clear()
    mlm_head.masked_lm_scores(oracle, tokenizer, LINES[:10], batch_size=4, max_length=12, seed=4)
    assert not all(torch.equal(a, c[1]) for a, c in zip(first, oracle.calls))  # another seed, other targets


def test_masked_lm_scores_of_nothing_is_nan(tokenizer):
    res = mlm_head.masked_lm_scores(Oracle(len(tokenizer)), tokenizer, [], seed=0)
    assert res["n"] == 0 and res["loss"] != res["loss"] and res["accuracy"] != res["accuracy"]


def test_head_parameters_are_the_transform_and_biases_not_the_decoder_nor_layernorm():
    model = build_model()
    assert set(head_parameters(model)) == {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
                                           "cls.predictions.transform.dense.bias", "cls.predictions.decoder.bias"}
    model.cls.predictions.transform.dense.bias.requires_grad_(False)
    assert "cls.predictions.transform.dense.bias" not in head_parameters(model)


@pytest.mark.parametrize("extra_rows", [0, 3])
def test_informed_start_is_the_identity_and_the_smoothed_log_unigram_frequency(tokenizer, extra_rows):
    """Over the decoder's every row: where the model has rows beyond the tokenizer's ids they start at add-one."""
    model = build_model(extra_rows=extra_rows)
    lines = LINES * 7  # 280 lines: two chunks of 256
    layer_norm = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    mlm_head._informed_start(model, tokenizer, lines, 9)
    counts = torch.ones(len(tokenizer) + extra_rows, dtype=torch.float64)
    for line in lines:
        for i in tokenizer(line, truncation=True, max_length=9)["input_ids"]:
            counts[i] += 1
    dense = model.cls.predictions.transform.dense
    assert torch.equal(dense.weight, torch.eye(dense.weight.shape[0])) and not dense.bias.any()
    for bias in (model.cls.predictions.bias, model.cls.predictions.decoder.bias):
        assert torch.allclose(bias, (counts / counts.sum()).log().float(), atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        if "LayerNorm" in n:
            assert torch.equal(p, layer_norm[n]), n


# ---- the fit -----------------------------------------------------------------------------------------------------
def reference_fit(model, tokenizer, train, heldout, cfg) -> list[dict]:
    """The fit as its docstring describes it, written out: informed start, AdamW on the head alone, BERT masking
    from one seeded generator, whole batches of a fresh permutation per pass, a held-out check every eval_every
    steps and at the last one, an end when the held-out loss falls by less than min_gain of the best."""
    params = head_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    mlm_head._informed_start(model, tokenizer, train, cfg.max_length)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    def check(step: int) -> dict:
        return {"step": step, **mlm_head.masked_lm_scores(model, tokenizer, heldout, max_length=cfg.max_length,
                                                          seed=cfg.seed)}

    history = [check(0)]
    model.train()
    step = 0
    while True:
        order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(max(1, len(train) // cfg.batch_size)):
            enc = tokenizer([train[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size]], truncation=True,
                            max_length=cfg.max_length, padding=True, return_tensors="pt",
                            return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask").bool() | (enc["attention_mask"] == 0)
            ids, labels = mask_tokens(enc["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), gen)
            opt.zero_grad()
            model(**{**enc, "input_ids": ids}, labels=labels)["loss"].backward()
            opt.step()
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                best = min(h["loss"] for h in history)
                history.append(check(step))
                if (best - history[-1]["loss"]) / best < cfg.min_gain or step == cfg.max_steps:
                    return history


@pytest.mark.parametrize("cfg", [CFG, HeadFitConfig(max_steps=5, batch_size=12, max_length=16, eval_every=2,
                                                     lr=1e-2, seed=3, min_gain=-1e9)])
def test_fit_head_is_the_reference_fit(tokenizer, cfg):
    train, heldout = split_heldout(LINES, 0.1)
    ref_model = build_model()
    torch.manual_seed(0)
    ref = reference_fit(ref_model, tokenizer, train, heldout, cfg)
    model, steps, log = build_model(), [], []
    encoder = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bert.")}
    model.bert.embeddings.LayerNorm.weight.requires_grad_(False)  # the encoder's own flags come back as they were
    torch.manual_seed(0)
    record = fit_head(model, tokenizer, train, heldout, cfg, log.append, on_step=lambda s, n: steps.append((s, n)))
    assert same_head(head(model), head(ref_model))
    assert record["history"] == ref and record["heldout"] == ref[-1] and record["steps"] == cfg.max_steps
    assert [h["step"] for h in ref] == sorted({*range(0, cfg.max_steps, cfg.eval_every), cfg.max_steps})
    assert record["config"] == dataclasses.asdict(cfg) and not record["stopped"] and "checkpoint" not in record
    assert 0 < record["seconds"] < 60 and steps == [(s, cfg.max_steps) for s in range(1, cfg.max_steps + 1)]
    assert log == [f"MLM head fit: step {h['step']}, held-out loss {h['loss']:.3f}, top-1 {h['accuracy']:.1%}"
                   for h in ref[1:]]
    for n, p in model.named_parameters():
        if n.startswith("bert."):
            assert torch.equal(p, encoder[n]), n  # frozen during the fit
            assert p.requires_grad == (n != "bert.embeddings.LayerNorm.weight"), n


def test_fit_head_ends_when_the_held_out_loss_stops_falling(tokenizer):
    """The fit ends at the first check whose gain over the best loss so far is below ``min_gain``: for each
    check that a threshold can single out, an early-ending fit equals the full fit up to that check. A learning
    rate that moves this tiny head's loss enough that the gains differ (and a later check can be singled out)."""
    train, heldout = split_heldout(LINES, 0.1)
    base = dataclasses.replace(CFG, lr=5e-2, max_steps=8)
    torch.manual_seed(0)
    full = fit_head(build_model(), tokenizer, train, heldout, base)["history"]
    losses = [h["loss"] for h in full]
    gains = [(min(losses[:k]) - losses[k]) / min(losses[:k]) for k in range(1, len(losses))]
    ended = []
    for k in range(len(gains)):  # a threshold just above the k-th check's gain (and below the earlier ones) ends there
        if all(g > gains[k] + 1e-4 for g in gains[:k]):
            torch.manual_seed(0)
            cfg = dataclasses.replace(base, min_gain=gains[k] + 1e-5)
            record = fit_head(build_model(), tokenizer, train, heldout, cfg)
            assert record["history"] == full[:k + 2] and record["steps"] == full[k + 1]["step"], k
            ended.append(k)
    assert gains[0] > 0 and ended[0] == 0 and max(ended) >= 1, (gains, ended)  # a later check was singled out too


def test_a_bf16_fit_runs_its_steps_in_bf16_and_follows_the_float32_fit(tokenizer):
    """Under bf16 the encoder runs in bf16 and the head in float32 but for its frozen decoder's product
    (``MaskedLMForSFT.head_logits``; that the head's small updates survive is tested in test_loading.py)."""
    train, heldout = split_heldout(LINES, 0.1)
    cfg = dataclasses.replace(CFG, max_steps=12, eval_every=4, lr=3e-2)
    losses = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model()
        record = fit_head(model, tokenizer, train, heldout, cfg, amp=precision.resolve(name, "cpu"))
        losses[name] = [h["loss"] for h in record["history"]]
        cast = model.cls.predictions.decoder._cast
        assert (cast[1].dtype if cast else None) == (torch.bfloat16 if name == "bf16" else None)
    assert losses["fp32"][-1] < losses["fp32"][0] - 0.02  # the fit learns something to follow
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-3)
    assert losses["bf16"] != losses["fp32"]  # (and not by running in float32)


def test_fit_head_on_fewer_lines_than_a_batch_takes_one_step_a_pass(tokenizer):
    steps = []
    torch.manual_seed(0)
    record = fit_head(build_model(), tokenizer, LINES[:5], LINES[5:7], CFG, on_step=lambda s, n: steps.append(s))
    assert record["steps"] == CFG.max_steps and steps == list(range(1, CFG.max_steps + 1))
    with pytest.raises(ValueError, match="at least one line"):
        fit_head(build_model(), tokenizer, [], LINES, CFG)


@pytest.mark.parametrize("lines, share, held", [
    (20, 0.1, [9, 19]), (19, 0.1, []), (30, 0.3, [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]),
    (21, 0.9, list(range(1, 21, 2))), (40, 0.0, []), (40, -0.5, [])])
def test_split_heldout_holds_every_n_th_line_out(lines, share, held):
    items = [f"l{i}" for i in range(lines)]
    train, out = split_heldout(items, share)
    assert out == [f"l{i}" for i in held] and train == [x for x in items if x not in out]
    assert isinstance(train, list)


# ---- the cache's key and record ----------------------------------------------------------------------------------
def test_the_cache_key_is_every_input_of_the_fit(fitted, new_model, tokenizer, cache):
    import hashlib

    record = fitted[1]
    assert record["text_sha256"] == hashlib.sha256("\n".join(LINES).encode()).hexdigest()
    assert (record["n_lines"], record["layer"], record["steps"]) == (40, None, CFG.max_steps)
    torch.manual_seed(0)
    assert not cached_fit(new_model(), tokenizer, "other base", LINES, CFG)["cached"]
    torch.manual_seed(0)
    assert not cached_fit(new_model(), tokenizer, "tiny", LINES[:-1], CFG)["cached"]
    torch.manual_seed(0)
    assert not cached_fit(new_model(), tokenizer, "tiny", LINES, dataclasses.replace(CFG, seed=1))["cached"]
    layered = new_model()
    layered.mlm_layer = 1
    torch.manual_seed(0)
    assert cached_fit(layered, tokenizer, "tiny", LINES, CFG)["layer"] == 1
    torch.manual_seed(0)
    bf16 = cached_fit(new_model(), tokenizer, "tiny", LINES, CFG, amp=precision.resolve("bf16", "cpu"))
    assert not bf16["cached"] and bf16["precision"] == "bf16" and record["precision"] == "fp32"
    assert len(list(cache.glob("*.safetensors"))) == 6
    assert fit_cached(new_model(), tokenizer)["cached"]


def test_a_small_text_is_scored_on_its_first_batch(new_model, tokenizer, cache):
    torch.manual_seed(0)
    record = cached_fit(new_model(), tokenizer, "tiny", LINES[:19], CFG)  # under 20 lines: nothing held out
    torch.manual_seed(0)
    direct = fit_head(new_model(), tokenizer, LINES[:19], LINES[:12], CFG)
    assert record["history"] == direct["history"] and record["n_lines"] == 19


def test_cache_messages_in_full(fitted, new_model, tokenizer, cache, tmp_path, monkeypatch):
    weights, record_file = entry(cache)
    record_file.write_text("{")
    log = []
    fit_cached(new_model(), tokenizer, log)
    assert log[0] == (f"the cached MLM head {weights.with_suffix('')}.safetensors is damaged (unreadable: Expecting "
                      "property name enclosed in double quotes: line 1 column 2 (char 1)); it is not used")
    record_file.write_text(json.dumps({"sha256": "0"}))
    log.clear()
    fit_cached(new_model(), tokenizer, log)
    assert log[0].endswith("is damaged (its checksum does not match); it is not used")
    for damage, said in [
        ("wrong shapes, checksum matching", "is damaged (its tensors are not those of this head (cls.predictions.bias, "
         "cls.predictions.decoder.bias, cls.predictions.transform.dense.bias)); it is not used"),
        ("a tensor missing, checksum matching",
         "(its tensors are not those of this head (cls.predictions.bias)); it is not used"),
        ("nan, checksum matching", "is damaged (it holds NaN or infinite values); it is not used"),
        ("nan, record of an older version", "is damaged (it holds NaN or infinite values); it is not used"),
        ("record a list", "is damaged (its record is not a JSON object); it is not used"),
    ]:
        _damage(damage, weights, record_file)
        log.clear()
        fit_cached(new_model(), tokenizer, log)
        assert log[0].endswith(said), (damage, log[0])
    weights.write_bytes(b"")
    assert fit_cached(new_model(), tokenizer)["steps"] == CFG.max_steps  # damaged, nobody told: no message, no error
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "other"))
    log.clear()
    fit_cached(new_model(), tokenizer, log, stop=lambda: True)
    partial = tmp_path / "other" / "heads" / f"{weights.stem}.partial"
    log.clear()
    fit_cached(new_model(), tokenizer, log)
    assert log[0] == f"MLM head fit resumed at step 1 from {partial}.safetensors"
    monkeypatch.setenv("DEFTX_CACHE", str(tmp_path / "third"))
    heads = tmp_path / "third" / "heads"
    heads.mkdir(parents=True)
    with read_only(heads):
        log.clear()
        fit_cached(new_model(), tokenizer, log, stop=lambda: True)
        message = log[0]
    assert message.startswith(f"could not cache the MLM head in {heads} (") and message.endswith("); set DEFTX_CACHE")
    assert "None" not in message and "[Errno" not in message


def test_a_stopped_fit_s_checkpoint(new_model, tokenizer, cache):
    stops = []
    model = new_model()
    record = fit_cached(model, tokenizer, stop=lambda: stops.append(1) or len(stops) == 2)
    assert record["steps"] == 2 and record["stopped"]
    kept = load_file(str(next(cache.glob("*.partial.safetensors"))))
    meta = json.loads(next(cache.glob("*.partial.json")).read_text())
    assert (meta["step"], meta["position"], [h["step"] for h in meta["history"]]) == (2, 2, [0, 2])
    assert meta["seconds"] > 0 and kept["order"].shape == (36,) and sorted(kept["order"].tolist()) == list(range(36))
    assert torch.equal(kept["rng"], torch.get_rng_state())
    for n, p in head_parameters(model).items():
        assert torch.equal(kept[f"head.{n}"], p.detach())
        moved = p.grad is not None
        assert float(kept[f"step.{n}"]) == (2.0 if moved else 0.0), n
        assert bool(kept[f"exp_avg_sq.{n}"].any()) == moved and bool(kept[f"exp_avg.{n}"].any()) == moved, n
