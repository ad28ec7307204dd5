"""DeFT-X: zero-shot cross-lingual transfer by composable, SVD-denoised sparse fine-tunings.

The core (denoise, masks, vectors) imports only torch and safetensors; training, evaluation and Hub
functions load transformers/huggingface_hub on first use, so importing the package stays fast.
"""
__version__ = "0.1.0"

from .denoise import DenoiseConfig, DenoiseRecord, denoise_deltas, denoise_matrix  # noqa: E402
from .errors import ConfigError, DataError, DeftxError, VectorError  # noqa: E402
from .masks import densities, overlap, select_top_k  # noqa: E402
from .params import parameter_roles  # noqa: E402
from .vectors import SparseVector, VectorMeta, base_fingerprint, compose  # noqa: E402

_LAZY = {"TrainConfig": "train", "train_sft": "train", "composed_model": "evaluate",
         "predict_proba": "evaluate", "classification_metrics": "evaluate", "push_vector": "hub",
         "pull_vector": "hub", "load_corpus": "data", "load_task_data": "data", "RunDir": "runs"}

__all__ = ["DenoiseConfig", "DenoiseRecord", "denoise_deltas", "denoise_matrix", "ConfigError", "DataError",
           "DeftxError", "VectorError", "densities", "overlap", "select_top_k", "parameter_roles",
           "SparseVector", "VectorMeta", "base_fingerprint", "compose", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deftx_engine' has no attribute {name!r}")
