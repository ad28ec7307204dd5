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
    from webapp import default_home
    from webapp.ui import build_app, launch_kwargs

    home = default_home()
    demo = build_app(home)
    on_space = bool(os.environ.get("SPACE_ID"))
    server_name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1")
    server_port = int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    # DEFTX_AUTH="user:password[,user2:password2]": a login page for a shared deployment
    auth = [tuple(pair.split(":", 1)) for pair in os.environ.get("DEFTX_AUTH", "").split(",") if ":" in pair] or None
    print(f"DeFT-X Studio: data in {home}", flush=True)
    demo.launch(server_name=server_name, server_port=server_port, auth=auth, **launch_kwargs(home))


if __name__ == "__main__":
    main()
