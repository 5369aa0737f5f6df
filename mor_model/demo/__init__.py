"""``mor-sr demo``: a Gradio page that upscales an image and shows how much of the adapter it used.

:mod:`.engine` (no Gradio) checks and upscales one image and gathers what the page shows;
:mod:`.examples` makes offline example inputs; :mod:`.app` is the Gradio page (Gradio is imported
there only: ``pip install 'mor-sr[demo]'``). The command is :mod:`mor_model.cli.demo`.
"""
