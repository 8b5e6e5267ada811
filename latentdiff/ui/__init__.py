"""The web UI, ``latentdiff serve`` (serve.py): a Gradio page (app.py, the only module that imports gradio, the
optional ui extra) over one loaded pipeline (studio.py), with latent previews (preview.py) and the training
runs beside the model (runs.py)."""
