"""Phase 1's embedding fast path trains only the used rows, and is the same optimisation as the dense one."""
import contextlib

import torch

from deftx_engine.embedding_rows import MLMCollator, train_rows_only, used_rows
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
