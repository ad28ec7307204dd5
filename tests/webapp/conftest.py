"""Shared fixtures of the web-app tests: free ports, the app's API handlers bound to a ``Studio`` (called
directly, no page needed), and launched apps on 127.0.0.1."""
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported (by the fixtures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a free localhost port."""
    return _free_port


@pytest.fixture(scope="session")
def api() -> Callable:
    """``api(studio)``: the app's API endpoints by name as plain functions of that Studio, returning what an
    API call returns (the values in the endpoint's output order)."""
    from webapp.components import bind
    from webapp.tabs import analyze, data, hub, predict, runs, train

    handlers = {"validate_data": data.validate_data, "apply_preset": train.apply_preset,  # as webapp/tabs wire them
                "start_training": train.start_training, "cancel_run": train.cancel_run,
                "resume_run": train.resume_run, "run_status": runs.run_status, "list_runs": runs.list_runs,
                "analyze": analyze.analyze, "spectrum": analyze.spectrum, "predict": predict.predict,
                "predict_file": predict.predict_file, "evaluate": predict.evaluate_file, "push": hub.push,
                "pull": hub.pull}

    def endpoints(studio) -> dict[str, Callable]:
        return {name: bind(fn, studio) for name, fn in handlers.items()}

    return endpoints


@pytest.fixture(scope="session")
def launch_app() -> Callable:
    """``launch_app(home, **launch kwargs)`` -> (demo, studio): a started Studio on ``home`` and its page on a
    free 127.0.0.1 port. The caller shuts both down (``studio.registry.shutdown``, ``demo.close``)."""
    from webapp.state import Studio
    from webapp.ui import build_app

    def launch(home: Path, **kwargs):
        studio = Studio(home).start()
        demo = build_app(studio)
        demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True, **kwargs)
        return demo, studio

    return launch


@pytest.fixture(scope="module")
def released_hub(tmp_path_factory):
    """The local Hub (tests/hub_server.py) for a module's apps, the ``huggingface_hub`` client pointed at it,
    serving a tiny base model as FacebookAI/xlm-roberta-base and composable-sft releases made for it
    (``tiny.publish_tiny_release``); yields (hub, the base model's folder). The apps run in this process: they
    use the client's constants."""
    from hub_server import HubServer, point_client_at

    from tiny import publish_tiny_release

    with HubServer() as hub, pytest.MonkeyPatch.context() as mp:
        point_client_at(mp, hub, tmp_path_factory.mktemp("hf-cache"))
        yield hub, publish_tiny_release(hub, tmp_path_factory.mktemp("release"))
