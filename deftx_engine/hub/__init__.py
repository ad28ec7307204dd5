"""Sharing vectors: pushing to and pulling from the Hugging Face Hub, the gallery of released vectors (with its
catalogue.json fallback when the Hub does not answer), reading Composable-SFT checkpoints, and keeping tokens secret."""
