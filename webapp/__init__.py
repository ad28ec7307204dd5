"""DeFT-X Studio web app: a thin Gradio layer over ``deftx_engine`` (see README, section "Web app").

- ``settings``: every ``DEFTX_*`` environment variable and the launch settings;
- ``files``: the upload and path policy; ``state``: ``Studio``, the app state (registry, caches, services);
- ``jobs``: the SQLite job registry and the scheduler that runs training as CLI processes;
- ``render``: pure HTML/Markdown rendering; ``components``: the component registry and the handler contract;
- ``tabs/``: one module per tab (layout and handlers); ``ui``: ``build_app(studio)`` -> ``gr.Blocks``.

Importing this package is cheap: Gradio is imported by ``components``, ``tabs`` and ``ui``, torch and
transformers only by the handlers that need them.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"
EXAMPLE = {"corpus": EXAMPLES / "target_corpus_id.txt", "task": EXAMPLES / "source_task_en.csv",
           "eval": EXAMPLES / "target_eval_id.csv"}  # preselected for a newcomer, per Data-tab role
EXAMPLE_LANG = {"language": "id", "task": "en"}
DATA_SUFFIXES = [".txt", ".csv", ".tsv", ".jsonl"]
