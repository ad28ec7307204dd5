import pytest
import torch

from deftx_engine.errors import ConfigError
from deftx_engine.method import masks
from deftx_engine.method.masks import densities, k_from, mask_size, overlap, select_top_k
from deftx_engine.method.params import layer_of, module_type, parameter_roles


@pytest.mark.parametrize("k", [0, 1, 17, 500, 999, 1000])
def test_exact_k_and_largest(k):
    g = torch.Generator().manual_seed(0)
    s = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(400, generator=g)}
    m = select_top_k(s, k)
    assert mask_size(m) == k
    chosen = torch.cat([s["a"].flatten()[m["a"]].abs(), s["b"][m["b"]].abs()])
    rest = torch.cat([s["a"].flatten().abs(), s["b"].abs()])
    if 0 < k < 1000:
        assert chosen.min() >= rest.topk(k).values.min()
    for idx in m.values():
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all())


def test_tie_breaking_is_deterministic():
    s = {"a": torch.ones(10), "b": torch.ones(10)}
    m = select_top_k(s, 13)
    assert m["a"].tolist() == list(range(10)) and m["b"].tolist() == [0, 1, 2]
    s = {"a": torch.tensor([0.5, 2.0, 1.0, 1.0, 1.0]), "b": torch.tensor([1.0, -1.0])}
    m = select_top_k(s, 3)
    assert m["a"].tolist() == [1, 2, 3] and m["b"].tolist() == []
    assert select_top_k({"a": -torch.ones(4)}, 2)["a"].tolist() == [0, 1]  # magnitude, not sign


def test_values_sharing_high_bits():
    # values that differ only in the low 16 bits of their float pattern exercise the second radix level
    base = torch.tensor([1.0]).view(torch.int32)
    vals = (base + torch.arange(100, dtype=torch.int32)).view(torch.float32)
    m = select_top_k({"x": vals[torch.randperm(100, generator=torch.Generator().manual_seed(1))]}, 7)
    shuffled = vals[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    assert sorted(shuffled[m["x"]].tolist()) == sorted(vals[-7:].tolist())


def test_k_bounds():
    with pytest.raises(ConfigError, match="outside"):
        select_top_k({"a": torch.ones(5)}, 6)
    assert k_from(0.25, 1000) == 250 and k_from(30, 1000) == 30
    with pytest.raises(ConfigError):
        k_from(-3, 10)


def test_overlap_on_hand_made_masks():
    a = {"bert.encoder.layer.0.attention.self.query.weight": torch.tensor([0, 1, 2, 3]),
         "bert.encoder.layer.1.intermediate.dense.weight": torch.tensor([5, 6])}
    b = {"bert.encoder.layer.0.attention.self.query.weight": torch.tensor([2, 3, 4]),
         "bert.embeddings.word_embeddings.weight": torch.tensor([9])}
    o = overlap(a, b)
    assert o["overall"] == {"a": 6, "b": 4, "shared": 2, "share_of_a": 2 / 6, "share_of_b": 2 / 4,
                            "jaccard": 2 / 8}
    assert o["per_layer"]["layer.0"]["jaccard"] == 2 / 5
    assert o["per_layer"]["layer.1"]["shared"] == 0
    assert o["per_module"]["attn.Q"]["shared"] == 2
    assert o["per_module"]["embeddings"]["b"] == 1 and o["per_module"]["ffn"]["a"] == 2
    assert o["per_group"]["attention"] == {"a": 4, "b": 3, "shared": 2, "share_of_a": 0.5, "share_of_b": 2 / 3,
                                           "jaccard": 2 / 5}
    assert (o["per_group"]["ffn"]["a"], o["per_group"]["embeddings"]["b"]) == (2, 1)
    from deftx_engine.outputs.report import overlap_by_group

    lines = overlap_by_group(o)
    assert lines[0] == "attention: 66.7% of A's entries, 75.0% of B's; shared 2 (50.0% of A's there, Jaccard 0.400)"
    assert [line.split(":")[0] for line in lines] == ["attention", "embeddings", "ffn"]


def test_densities():
    shapes = {"bert.encoder.layer.0.x.weight": (10, 10), "bert.encoder.layer.0.x.bias": (10,),
              "bert.encoder.layer.1.x.weight": (5, 2)}
    mask = {"bert.encoder.layer.0.x.weight": torch.arange(20), "bert.encoder.layer.1.x.weight": torch.arange(5)}
    assert densities(mask, shapes)["bert.encoder.layer.0.x.weight"] == 0.2
    per_layer = densities(mask, shapes, layer_of)
    assert per_layer == {"layer.0": 20 / 110, "layer.1": 0.5}


def test_parameter_roles(tiny_cls_model):
    roles = parameter_roles(tiny_cls_model)
    assert all("LayerNorm" in n for n in roles.frozen) and len(roles.frozen) == 2 * (1 + 2 * 2)
    assert roles.heads == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    assert "bert.embeddings.word_embeddings.weight" in roles.maskable
    assert not any("LayerNorm" in n for n in roles.maskable)


def test_module_type_names():
    assert module_type("roberta.encoder.layer.3.attention.self.key.weight") == "attn.K"
    assert module_type("roberta.encoder.layer.3.attention.output.dense.weight") == "attn.O"
    assert module_type("roberta.encoder.layer.3.output.dense.weight") == "ffn"
    assert module_type("roberta.encoder.layer.3.intermediate.dense.bias") == "ffn"
    assert module_type("roberta.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_of("roberta.encoder.layer.11.output.dense.weight") == "layer.11"


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_top_k_over_matrices_that_span_several_chunks(monkeypatch, chunk):
    """Against one torch.topk of everything: every chunk's indices are offset to the matrix, not the chunk."""
    import reference

    monkeypatch.setattr(masks, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(9)
    scores = {"emb": torch.randn(700, 16, generator=g), "w": torch.randn(40, 30, generator=g) * 2,
              "b": torch.randn(30, generator=g)}
    for k in (1, 500, 5000):
        chosen = masks.select_top_k(scores, k)
        expected = reference.global_top_k(scores, k)
        assert {n: set(i.tolist()) for n, i in chosen.items()} == expected


# ---- what mutation testing found unguarded (RESULTS.md, "Mutation testing") --------------------------------
def test_ties_at_the_threshold_go_to_the_earliest_entries():
    scores = {"a": torch.tensor([1.0, 3.0, 1.0, 1.0]), "b": torch.tensor([1.0, 2.0, 1.0])}
    mask = select_top_k(scores, 4)
    assert [m.tolist() for m in mask.values()] == [[0, 1, 2], [1]]
    assert [m.tolist() for m in select_top_k(scores, 6).values()] == [[0, 1, 2, 3], [0, 1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_top_k_of_other_float_types(dtype):
    import reference

    g = torch.Generator().manual_seed(4)
    scores = {"w": torch.randn(50, 7, generator=g).to(dtype), "e": torch.empty(0, 3, dtype=dtype)}
    chosen = select_top_k(scores, 40)
    assert chosen["e"].numel() == 0 and chosen["e"].dtype == torch.int64
    if dtype == torch.float64:  # (half types have ties that topk breaks its own way)
        assert set(chosen["w"].tolist()) == reference.global_top_k(scores, 40)["w"]
    vals = scores["w"].float().abs().reshape(-1)
    assert float(vals[chosen["w"]].min()) >= float(vals.topk(40).values.min())


def test_k_from_counts_and_fractions():
    assert (k_from(1.0, 100), k_from(3.0, 100), k_from(0, 10), k_from(0.25, 100)) == (1, 3, 0, 25)


def test_overlap_sums_over_the_parameters_of_a_group():
    q, k = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.key.weight"
    o = overlap({q: torch.tensor([1, 2]), k: torch.tensor([3])}, {q: torch.tensor([2]), k: torch.tensor([3, 4])})
    assert (o["per_group"]["attention"]["a"], o["per_group"]["attention"]["shared"]) == (3, 2)
    assert o["per_layer_module"]["layer.0|attn.Q"]["shared"] == 1
    empty = overlap({}, {q: torch.tensor([1])})["overall"]
    assert (empty["share_of_a"], empty["share_of_b"], empty["jaccard"]) == (0.0, 0.0, 0.0)
    assert overlap({}, {})["overall"]["jaccard"] == 0.0
