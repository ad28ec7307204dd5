"""The models the method is applied to: loading a base encoder (aliases, local folder or Hub id) with its
masked-LM or classification head, the fitted MLM head for bases without one, the offline multilingual-e5-small
base, the named presets of ``--preset``, and the number format (bf16 or fp32) steps and scoring run in."""
