"""``MaskedLMForSFT``'s head under autocast: float32 but for the product with its frozen decoder."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM

from deftx_engine.models.loading import FrozenDecoder, MaskedLMForSFT
from tiny import tiny_bert_config


@pytest.fixture
def model():
    """A tiny model shaped as ``load_mlm_model`` makes it: decoder = a frozen copy of the input embeddings."""
    torch.manual_seed(0)
    mlm = BertForMaskedLM(tiny_bert_config(vocab_size=50))
    out = mlm.get_output_embeddings()
    out.weight = torch.nn.Parameter(mlm.get_input_embeddings().weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        out.bias.copy_(torch.linspace(-12.0, -3.0, 50))  # a log-unigram start's range
    return MaskedLMForSFT(mlm, None, head_is_new=True)


def reference_logits(model, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Transform in float32, the decoder product in ``dtype`` (inputs rounded to it), the bias added in float32."""
    pred = model.cls.predictions
    t = pred.transform(hidden)
    return torch.mm(t.to(dtype), pred.decoder.weight.detach().to(dtype).T).float() + pred.decoder.bias


def test_the_decoder_keeps_its_parameters_and_names(model):
    dec = model.cls.predictions.decoder
    assert type(dec) is FrozenDecoder and not dec.weight.requires_grad
    assert {n for n, _ in dec.named_parameters()} == {"weight", "bias"}
    assert "cls.predictions.decoder.weight" in model.state_dict()


def test_without_autocast_the_head_is_the_plain_head(model):
    hidden = torch.randn(7, model.config.hidden_size)
    assert torch.equal(model.head_logits(hidden), model.cls(hidden))


def test_under_bf16_autocast_only_the_decoder_product_is_bf16(model):
    hidden = torch.randn(7, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.head_logits(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(model, hidden, torch.bfloat16), rtol=0, atol=1e-5)
    assert model.cls.predictions.decoder.matmul_dtype is None  # the setting does not outlive the call


def test_an_update_below_bf16_spacing_shows_in_the_logits(model):
    """A bias near -12 moves in steps of 0.0625 in bf16: an AdamW step of 1e-3 must still change the logits."""
    hidden = torch.randn(7, model.config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model.head_logits(hidden)
        with torch.no_grad():
            model.cls.predictions.decoder.bias.add_(1e-3)
            model.cls.predictions.transform.dense.bias.add_(1e-3)
        after = model.head_logits(hidden)
    torch.testing.assert_close(after, reference_logits(model, hidden, torch.bfloat16), rtol=0, atol=1e-5)
    assert (after - before - 1e-3).abs().max() < 0.05  # the bias's part arrives; the transform's is small
    assert not torch.equal(after, before + 1e-3)


def test_the_decoder_is_cast_once_and_again_when_its_weight_changes(model):
    hidden = torch.randn(7, model.config.hidden_size)
    dec = model.cls.predictions.decoder
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.head_logits(hidden)
        first = dec._cast[1]
        model.head_logits(hidden)
        assert dec._cast[1] is first and first.dtype == torch.bfloat16
        with torch.no_grad():
            dec.weight.mul_(2.0)
        logits = model.head_logits(hidden)
    assert dec._cast[1] is not first
    torch.testing.assert_close(logits, reference_logits(model, hidden, torch.bfloat16), rtol=0, atol=1e-5)


def test_the_head_s_gradients_under_bf16_follow_float32(model):
    hidden = torch.randn(64, model.config.hidden_size)
    target = torch.randint(0, 50, (64,))
    grads = {}
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model.head_logits(hidden), target).backward()
        grads[amp] = {n: p.grad.clone() for n, p in model.cls.named_parameters() if p.grad is not None}
    assert set(grads[True]) == set(grads[False]) and grads[True]
    for n, g in grads[True].items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, grads[False][n], rtol=0, atol=2e-2 * grads[False][n].abs().max().item())
