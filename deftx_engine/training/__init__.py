"""Training a sparse fine-tuning: typed settings (the torch-free config), corpus and task data, phase 1 (dense
deltas) then the masked phase 2, the run folder that holds a run's state and outputs, and its progress, timing and
tables."""
