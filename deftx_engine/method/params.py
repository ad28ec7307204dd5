"""Which parameters a sparse fine-tuning may touch.

One rule, used by every caller (training, masks, vectors, composition):
- every parameter of the encoder (``model.base_model_prefix``) is *maskable*, embeddings included;
- LayerNorm weights and biases are *frozen*: never trained, never stored (as in LT-SFT and DeFT-X);
- everything outside the encoder (classification head, masked-LM head) is a *head*: trained densely
  and stored whole in the vector, because a new head has no pretrained value to be sparse against.
  The encoder's pooler counts as head too: many checkpoints (the MiniLM default among them) ship none,
  so its starting value is random and a sparse diff against it could not be reproduced elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

NORM_CLASS_HINTS = ("LayerNorm", "RMSNorm", "GroupNorm")


@dataclass
class ParameterRoles:
    """Parameter names of a model split by role (each list in ``named_parameters`` order)."""

    maskable: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or any(h in type(module).__name__ for h in NORM_CLASS_HINTS)


def parameter_roles(model: nn.Module) -> ParameterRoles:
    """Split ``model``'s parameters into maskable / head / frozen (see module docstring).

    Tied parameters are reported once, under the first name ``named_parameters`` gives them.
    """
    norm_params = {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, module in model.named_modules()
        if _is_norm(module)
        for p_name, _ in module.named_parameters(recurse=False)
    }
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_prefix = bool(prefix) and hasattr(model, prefix)
    roles = ParameterRoles()
    for name, _ in model.named_parameters():
        if name in norm_params:
            roles.frozen.append(name)
        elif ".pooler." not in name and (not has_prefix or name.startswith(prefix + ".")):
            roles.maskable.append(name)
        else:
            roles.heads.append(name)
    return roles


def module_type(name: str) -> str:
    """Coarse module type of a parameter name, for overlap and density reports."""
    n = name.lower()
    if "embed" in n:
        return "embeddings"
    for key, label in (("query", "attn.Q"), ("q_proj", "attn.Q"), ("key", "attn.K"), ("k_proj", "attn.K"),
                       ("value", "attn.V"), ("v_proj", "attn.V")):
        if f".{key}." in n or n.endswith(f".{key}"):
            return label
    if "attention.output" in n or "o_proj" in n or "out_proj" in n:
        return "attn.O"
    if "intermediate" in n or ".output.dense" in n or "ffn" in n or "mlp" in n or "fc" in n:
        return "ffn"
    if "pooler" in n:
        return "pooler"
    return "other"


def param_group(name: str) -> str:
    """The ``constants.PARAM_GROUPS`` group of a parameter name ("other" for none of them)."""
    t = module_type(name)
    return "attention" if t.startswith("attn.") else t if t in ("embeddings", "ffn") else "other"


def restrict(roles: ParameterRoles, groups: str) -> ParameterRoles:
    """``roles`` with maskable parameters outside ``groups`` ("all" or a comma list) moved to frozen."""
    if groups == "all":
        return roles
    keep = set(groups.split(","))
    out = [n for n in roles.maskable if param_group(n) not in keep]
    return ParameterRoles(maskable=[n for n in roles.maskable if param_group(n) in keep], heads=roles.heads,
                          frozen=roles.frozen + out)


def layer_of(name: str) -> str:
    """Layer label of a parameter name: 'embeddings', 'layer.N', or the top-level module."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layer", "layers", "h", "block") and parts[i + 1].isdigit():
            return f"layer.{parts[i + 1]}"
    if "embed" in name:
        return "embeddings"
    return parts[1] if len(parts) > 2 else parts[0]


def trainable_setup(model: nn.Module, roles: ParameterRoles, mask: dict | None) -> None:
    """Phase 1: everything but frozen params trains. Phase 2: only masked params and heads."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name in roles.frozen:
            p.requires_grad_(False)
        elif mask is not None and name in roles.maskable:
            p.requires_grad_(name in mask and mask[name].numel() > 0)
