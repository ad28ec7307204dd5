"""DeFT-X: zero-shot cross-lingual transfer by composable, SVD-denoised sparse fine-tunings.

Names are imported on first use, so ``import deftx_engine.training.data`` (the web app's start-up path) does not
pay for torch, transformers or huggingface_hub.
"""
__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "errors", "DataError": "errors", "DeftxError": "errors", "VectorError": "errors",
    "DenoiseRecord": "method.denoise", "denoise_deltas": "method.denoise", "denoise_matrix": "method.denoise",
    "choose_mask": "method.denoise",
    "densities": "method.masks", "overlap": "method.masks", "select_top_k": "method.masks",
    "parameter_roles": "method.params",
    "SparseVector": "method.vectors", "VectorMeta": "method.vectors", "base_fingerprint": "method.vectors",
    "compose": "method.vectors", "ties_merge": "method.merge",
    "DenoiseConfig": "method.denoise_config", "TrainConfig": "training.config", "train_sft": "training.train",
    "load_corpus": "training.data", "load_task_data": "training.data", "RunDir": "training.runs",
    "push_vector": "hub.transfer", "pull_vector": "hub.transfer",
    "composed_model": "outputs.inference", "predict_proba": "outputs.inference",
    "classification_metrics": "outputs.inference",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'deftx_engine' has no attribute {name!r}")
