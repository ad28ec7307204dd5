"""DeFT-X Studio web app (Gradio). Placeholder until the web-app issue lands."""
if __name__ == "__main__":
    raise SystemExit("The web app is not built yet; see README.md")
