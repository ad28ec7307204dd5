"""DeFT-X: zero-shot cross-lingual transfer by composable, SVD-denoised sparse fine-tunings.

Names are imported on first use, so ``import deftx_engine.data`` (the web app's start-up path) does not
pay for torch, transformers or huggingface_hub.
"""
__version__ = "0.1.0"

_LAZY = {
    "DenoiseConfig": "config", "DenoiseRecord": "denoise", "denoise_deltas": "denoise", "denoise_matrix": "denoise",
    "choose_mask": "denoise",
    "ConfigError": "errors", "DataError": "errors", "DeftxError": "errors", "VectorError": "errors",
    "densities": "masks", "overlap": "masks", "select_top_k": "masks", "parameter_roles": "params",
    "SparseVector": "vectors", "VectorMeta": "vectors", "base_fingerprint": "vectors", "compose": "vectors",
    "ties_merge": "merge",
    "TrainConfig": "config", "train_sft": "train", "composed_model": "inference", "predict_proba": "inference",
    "classification_metrics": "inference", "push_vector": "hub", "pull_vector": "hub",
    "load_corpus": "data", "load_task_data": "data", "RunDir": "runs",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deftx_engine' has no attribute {name!r}")
