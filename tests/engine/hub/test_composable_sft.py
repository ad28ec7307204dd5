"""composable-sft (pytorch_diff.bin) -> DeFT-X vector conversion: layouts, roles, refusals of unsafe pickles."""
import os
import pickle

import pytest
import torch

from deftx_engine.errors import VectorError
from deftx_engine.hub.composable_sft import convert_composable_sft, guess_from_name
from deftx_engine.hub.transfer import pull_vector
from deftx_engine.method.params import parameter_roles
from deftx_engine.method.vectors import SparseVector, base_fingerprint
from tiny import assert_same_vector, write_composable_sft


def test_convert_with_model_sets_fingerprint_and_uses_roles(mlm_model, tiny_cls_model, tmp_path):
    src = tmp_path / "csft"
    diffs = write_composable_sft(mlm_model, src, seed=1)
    vec = convert_composable_sft(src, tmp_path / "v", base_model="tiny", kind="language", language="yo",
                                 model=mlm_model)
    assert vec.meta.base_fingerprint == base_fingerprint(mlm_model)
    roles = parameter_roles(mlm_model)
    encoder = [n for n in roles.maskable + roles.frozen if n.startswith("bert.")]
    head_norms = [n for n in roles.frozen if n.startswith("cls.")]  # the MLM head's LayerNorm: head, not encoder
    assert head_norms and set(vec.indices) == {n for n in encoder if bool((diffs[n] != 0).any())}
    assert set(vec.meta.skipped_parameters) == set(roles.heads + head_norms)
    vec.validate(tiny_cls_model, where="a classifier")  # a language vector fits the task model it is composed on
    assert_same_vector(SparseVector.load(tmp_path / "v"), vec)


def test_convert_body_head_layout_with_sparse_tensors(tiny_cls_model, tmp_path):
    """The later composable-sft layout: {'body': {name: sparse COO diff}, 'head': {name: whole tensor}}."""
    params = dict(tiny_cls_model.named_parameters())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    dense = torch.zeros(params[name].shape)
    dense[3, 5], dense[0, 1], dense[15, 0] = 0.5, -0.25, 1.0
    head = {n: torch.randn(params[n].shape) for n in ("classifier.weight", "classifier.bias")}
    (tmp_path / "csft").mkdir()
    torch.save({"body": {name: dense.to_sparse()}, "head": head}, tmp_path / "csft" / "pytorch_diff.bin")
    vec = convert_composable_sft(tmp_path / "csft", tmp_path / "v", kind="task", model=tiny_cls_model)
    assert vec.indices[name].tolist() == sorted([3 * 16 + 5, 0 * 16 + 1, 15 * 16 + 0])
    assert torch.equal(vec.values[name], dense.reshape(-1)[vec.indices[name].long()])
    assert set(vec.heads) == set(head) and all(torch.equal(vec.heads[n], head[n]) for n in head)


def test_convert_task_skips_heads_the_model_does_not_have(tiny_cls_model, tmp_path):
    """A 'head' section's tensor that is no head of the given model (here an MLM head's bias on a classifier)
    is left out and listed as skipped, not kept as a head the model cannot load."""
    params = dict(tiny_cls_model.named_parameters())
    name = "bert.encoder.layer.0.attention.self.query.weight"
    head = {n: torch.randn(params[n].shape) for n in ("classifier.weight", "classifier.bias")}
    (tmp_path / "csft").mkdir()
    torch.save({"body": {name: torch.eye(16)}, "head": {**head, "cls.predictions.bias": torch.ones(120)}},
               tmp_path / "csft" / "pytorch_diff.bin")
    vec = convert_composable_sft(tmp_path / "csft", tmp_path / "v", kind="task", model=tiny_cls_model)
    assert set(vec.heads) == set(head) and vec.meta.skipped_parameters == ["cls.predictions.bias"]
    assert "cls.predictions.bias" not in SparseVector.load(tmp_path / "v").shapes


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(writer, tmp_path, mlm_model):
    marker = tmp_path / "pwned"
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Evil(armed)))  # the payload is real: plain unpickling runs it
    assert armed.exists()

    src = tmp_path / "csft"
    src.mkdir()
    payload = {"bert.embeddings.word_embeddings.weight": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, src / "pytorch_diff.bin")
    else:
        with open(src / "pytorch_diff.bin", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(VectorError, match="pytorch_diff.bin"):
        convert_composable_sft(src, tmp_path / "v", model=mlm_model)
    with pytest.raises(VectorError, match="pytorch_diff.bin"):
        pull_vector(str(src), tmp_path / "v2")
    assert not marker.exists()
    assert not (tmp_path / "v").exists() and not (tmp_path / "v2").exists()


def test_convert_with_model_rejects_parameters_the_model_lacks(tmp_path, mlm_model):
    (tmp_path / "csft").mkdir()
    torch.save({"bert.pooler.dense.bias": torch.ones(16), "cls.predictions.bias": torch.ones(120)},
               tmp_path / "csft" / "pytorch_diff.bin")  # an MLM model has no pooler
    with pytest.raises(VectorError, match="'bert.pooler.dense.bias' is not in the given model"):
        convert_composable_sft(tmp_path / "csft", tmp_path / "v", model=mlm_model)
    assert not (tmp_path / "v").exists()


def test_kind_and_language_are_guessed_from_composable_sft_repo_names():
    assert guess_from_name("cambridgeltl/mbert-lang-sft-bxr-small") == ("language", "bxr")
    assert guess_from_name("cambridgeltl/xlmr-lang-sft-zh_yue-small") == ("language", "zh_yue")
    assert guess_from_name("cambridgeltl/mbert-task-sft-pos") == ("task", None)
    assert guess_from_name("someone/model") == (None, None)
