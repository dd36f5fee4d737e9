"""The Gradio demo, outside the library (`vlm` never imports it): `demo.app` is the page and its command
(`python demo/app.py`, `vlm demo`), `demo.handlers` the event handlers over library calls."""
