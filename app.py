"""DeFT-X Studio web app: ``python app.py`` (also the Hugging Face Space entry point).

Serves on 127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override it; on a Space it binds 0.0.0.0).
Data, runs and pulled vectors live in DEFTX_HOME (default: .deftx next to this file; /data/deftx on a Space
with persistent storage). See README.md, section "Web app", for the tabs and every environment variable.
"""
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    logging.basicConfig(level=os.environ.get("DEFTX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from deftx_engine.errors import ConfigError
    from webapp import default_home, env_number
    from webapp.ui import build_app, launch_kwargs

    home = default_home()
    on_space = bool(os.environ.get("SPACE_ID"))
    server_name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1")
    try:
        server_port = env_number("GRADIO_SERVER_PORT", 7860, minimum=1)
        demo = build_app(home)
        # launch_kwargs: files served only from DEFTX_HOME/outputs, upload limit, DEFTX_AUTH logins
        kwargs = launch_kwargs(home)
    except ConfigError as e:  # a bad DEFTX_* setting: one line, no traceback
        raise SystemExit(f"DeFT-X Studio: {e}") from None
    print(f"DeFT-X Studio: data in {home}" + (" (login required)" if kwargs.get("auth") else ""), flush=True)
    demo.launch(server_name=server_name, server_port=server_port, **kwargs)


if __name__ == "__main__":
    main()
