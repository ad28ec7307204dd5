"""The method: DeFT-X itself, free of any training loop or app. Sparse vectors and their metadata, top-k masks,
SVD denoising of the phase-1 deltas and the mask choice, the sparse optimiser, composition and TIES merging, and
which parameters (and embedding rows) a fine-tuning may touch."""
