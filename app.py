"""DeFT-X Studio web app: ``python app.py`` (also the Hugging Face Space entry point).

Serves on 127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override it; on a Space it binds 0.0.0.0).
Data, runs and pulled vectors live in DEFTX_HOME (default: .deftx next to this file; /data/deftx on a Space
with persistent storage). See README.md, section "Web app", for the tabs and every environment variable.
"""
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    from deftx_engine.errors import ConfigError
    from webapp.settings import launch_kwargs, log_level, server_address

    try:  # before Gradio is imported: it reads GRADIO_SERVER_PORT itself, with a traceback for a bad value
        level = log_level()
        server_name, server_port = server_address()
    except ConfigError as e:  # a bad setting: one line, no traceback
        raise SystemExit(f"DeFT-X Studio: {e}") from None
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from webapp.state import Studio
    from webapp.ui import build_app

    try:
        studio = Studio()  # DEFTX_HOME; a bad DEFTX_* setting stops here
        # launch_kwargs: files served only from DEFTX_HOME/outputs, upload limit, DEFTX_AUTH logins
        kwargs = launch_kwargs(studio.home)
    except ConfigError as e:  # a bad DEFTX_* setting: one line, no traceback
        raise SystemExit(f"DeFT-X Studio: {e}") from None
    studio.start()  # reap runs whose process is gone, the scheduler, the background warm-up
    demo = build_app(studio)
    print(f"DeFT-X Studio: data in {studio.home}" + (" (login required)" if kwargs.get("auth") else ""), flush=True)
    demo.launch(server_name=server_name, server_port=server_port, **kwargs)


if __name__ == "__main__":
    main()
