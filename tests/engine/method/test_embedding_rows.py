"""Phase 1's embedding fast path trains only the used rows, and is the same optimisation as the dense one."""
import contextlib

import pytest
import torch

from deftx_engine.method.embedding_rows import MLMCollator, train_rows_only, used_rows
from tiny import tiny_bert_config


def _train(model, batches, rows=None, steps=6):
    emb = model.bert.get_input_embeddings()
    with train_rows_only(emb, rows) if rows is not None else contextlib.nullcontext():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for step in range(steps):
            ids, labels = batches[step % len(batches)]
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rows_only_matches_dense_training_and_leaves_other_rows_alone():
    from transformers import BertForSequenceClassification

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(5, 40, (4, 12), generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    rows = torch.unique(torch.cat([b[0].reshape(-1) for b in batches]))
    torch.manual_seed(0)
    dense_model = BertForSequenceClassification(tiny_bert_config(num_labels=3, hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0))
    fast_model = BertForSequenceClassification(dense_model.config)
    fast_model.load_state_dict(dense_model.state_dict())
    before = dense_model.bert.embeddings.word_embeddings.weight.detach().clone()
    dense, fast = _train(dense_model, batches), _train(fast_model, batches, rows)
    assert dense.keys() == fast.keys()  # the row delta was folded in and removed
    for n in dense:
        assert torch.allclose(dense[n], fast[n], atol=1e-5, rtol=1e-4), n  # lr 1e-2: 0.1 % of a step
    name = "bert.embeddings.word_embeddings.weight"
    unused = torch.ones(before.shape[0], dtype=torch.bool)
    unused[rows] = False
    assert torch.equal(fast[name][unused], before[unused])  # bit for bit
    assert not torch.equal(fast[name][rows], before[rows])
    assert fast_model.bert.embeddings.word_embeddings.weight.requires_grad


def test_mlm_collator_draws_replacements_from_the_corpus():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    rows = [{"input_ids": tok(" ".join(f"w{i}" for i in range(10)))["input_ids"]} for _ in range(64)]
    allowed = used_rows(rows, tok)
    assert set(allowed.tolist()) == set(range(5, 15)) | set(tok.all_special_ids)
    torch.manual_seed(0)
    batch = MLMCollator(tok, 0.5, allowed)(rows)
    assert set(batch["input_ids"].unique().tolist()) <= set(allowed.tolist())
    target = batch["labels"] != -100
    assert target.any() and (batch["input_ids"][target] == tok.mask_token_id).float().mean() > 0.6


# ---- what a mutation run found unguarded ------------------------------------------------------------------------
def _tokenizer():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_only_looks_up_frozen_rows_plus_the_delta_and_folds_it_in(dtype):
    """Inside: the output is the frozen row plus that row's delta (only for the rows given), in the embedding's
    dtype; on exit the delta is added to exactly those rows and the module is as it was."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4).to(dtype)
    emb.weight.requires_grad_(False)  # restored as it was, whatever it was
    before = emb.weight.detach().clone()
    rows = torch.tensor([1, 3, 7])
    ids = torch.tensor([[1, 2, 3], [7, 0, 9]])
    step = torch.arange(12, dtype=dtype).reshape(3, 4)
    with train_rows_only(emb, rows) as delta:
        assert delta.dtype == dtype and delta.shape == (3, 4) and not delta.abs().any()
        assert emb.row_delta is delta and not emb.weight.requires_grad
        with torch.no_grad():
            delta.add_(step)
        out = emb(ids)
        assert out.dtype == dtype
        want = before[ids] + torch.stack([torch.stack([step[0], torch.zeros(4, dtype=dtype), step[1]]),
                                          torch.stack([step[2], torch.zeros(4, dtype=dtype),
                                                       torch.zeros(4, dtype=dtype)])])
        assert torch.equal(out, want)
        out.float().sum().backward()
        assert torch.equal(delta.grad, torch.tensor([[1.0] * 4, [1.0] * 4, [1.0] * 4], dtype=dtype))
    assert not hasattr(emb, "row_delta") and not emb.weight.requires_grad
    assert emb.weight.dtype == dtype and len(emb._forward_hooks) == 0
    expected = before.clone()
    expected[rows] += step
    assert torch.equal(emb.weight, expected)
    assert torch.equal(emb(ids), expected[ids])  # the hook is gone


def test_rows_only_keeps_every_tensor_on_the_embedding_s_device():
    """On a device other than the CPU (here PyTorch's shape-only "meta" device, which needs no GPU) every tensor
    it makes is made there: a CPU tensor in the lookup or the fold-in fails."""
    emb = torch.nn.Embedding(10, 4, device="meta")
    with train_rows_only(emb, torch.tensor([1, 3])) as delta:
        assert delta.device.type == "meta"
        out = emb(torch.tensor([[1, 2, 3]], device="meta"))
        assert out.device.type == "meta" and out.shape == (1, 3, 4)
    assert emb.weight.device.type == "meta" and emb.weight.requires_grad


def test_used_rows_and_the_collator_s_specials_are_int64_even_when_empty():
    class NoSpecials:
        all_special_ids: list = []

    assert used_rows([], NoSpecials()).dtype == torch.long
    collator = MLMCollator(NoSpecials(), 0.15, torch.tensor([5, 6]))
    assert collator.special.dtype == torch.long and collator.candidates.tolist() == [5, 6]


def test_mlm_collator_masks_the_bert_way_at_its_own_probability():
    """At mlm_probability 0.5: about half of the word tokens are targets, never [CLS], [SEP] or padding; of the
    targets ~80 % <mask>, ~10 % a corpus token (never a special one), ~10 % kept; non-targets unchanged. Rows
    carrying ragged 'labels' (a dataset's own column) are padded without them."""
    tok = _tokenizer()
    rows = [{"input_ids": tok(" ".join(f"w{i}" for i in range(10 - r % 3)))["input_ids"],
             "labels": [0] * (1 + r % 5)} for r in range(200)]
    allowed = used_rows(rows, tok)
    collator = MLMCollator(tok, 0.5, allowed)
    assert collator.candidates.tolist() == list(range(5, 15))
    torch.manual_seed(0)
    batch = collator(rows)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    original = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True)
    words = (original >= 5) & (attn == 1)
    target = labels != -100
    assert torch.equal(labels[target], original[target]) and not (target & ~words).any()
    assert torch.equal(ids[~target], original[~target])
    assert 0.45 < target.sum() / words.sum() < 0.55
    masked, kept = ids[target] == tok.mask_token_id, ids[target] == original[target]
    replaced = ~masked & ~kept
    assert 0.75 < masked.float().mean() < 0.85 and 0.05 < kept.float().mean() < 0.15
    assert 0.05 < replaced.float().mean() < 0.15
    assert set(ids[target][replaced].tolist()) <= set(range(5, 15))
