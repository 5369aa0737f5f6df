"""The Gradio page of ``mor-sr demo`` (imported only by the demo: Gradio is the optional ``[demo]`` extra).

Left: the image (upload, or an example), the controls (scale, UNet tile, colour fix, dtype, fold switch)
and the Upscale button. Right: the SR image against the bicubic upscale on a before/after slider, a
download of the SR image, the seven degradation scores as a bar chart, the active ranks per MoR layer as a
heatmap over the last runs, seconds per stage and the ``mor_kernels`` backend. Progress shows tile by tile;
a failure is a message on the page and the server goes on.
"""

from __future__ import annotations

from pathlib import Path

from .engine import DemoEngine, DemoError, DemoResult, save_heatmap, score_labels

__all__ = ["build_demo"]

TILE_CHOICES = ["auto", "off", "16", "32", "64", "96"]
HISTORY = 8  # runs kept as columns of the heatmap


def _details(result: DemoResult, runs: list[str]) -> str:
    w, h = result.input_size
    ow, oh = result.output_size
    lines = [f"**input** {w}x{h} -> **output** {ow}x{oh}", ""]
    if result.scores:
        lines += ["| degradation | score |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result.scores.items()]
        lines.append("")
    if result.active:
        mean = sum(result.active) / len(result.active)
        lines.append(f"**active real ranks**: {mean:.2f} per MoR layer on average, over {len(result.active)} layers")
        lines.append("")
    lines += ["| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result.stage_seconds.items()]
    lines += ["", "**heatmap columns**: " + "; ".join(f"{i}: {r}" for i, r in enumerate(runs))]
    lines += ["", "**backend**", "```", result.backend, "```"]
    return "\n".join(lines)


def build_demo(engine: DemoEngine, examples: dict[str, Path], *, dtype: str = "fp32", fold_shared: bool = False):
    """The ``gr.Blocks`` of the page (not launched)."""
    import gradio as gr
    import pandas as pd

    pipe = engine.pipeline(dtype, fold_shared)
    labels = score_labels(pipe.estimator.prompt_pairs) if pipe.estimator is not None else []
    dtypes = ["fp32", "bf16"] if engine.device == "cpu" else ["fp32", "fp16", "bf16"]
    with gr.Blocks(title="mor-sr demo", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# mor-sr: one-step Mixture-of-Ranks super-resolution\n"
            "The adapter's routed ranks follow the degradation the CLIP estimator sees: compare the heatmap "
            "columns of a lightly and a heavily degraded example."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(
                    label="low-quality image (png, jpg, webp, bmp, tiff)",
                    file_types=[".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"],
                    type="filepath",
                    elem_id="input-file",
                )
                example = gr.Dropdown(
                    choices=list(examples),
                    value=None,
                    label="... or an example (scikit-image photos, degraded here)"
                    if examples
                    else "no examples (scikit-image is not installed)",
                    elem_id="example",
                )
                with gr.Row():
                    scale = gr.Dropdown([2, 3, 4], value=4, label="scale")
                    tile = gr.Dropdown(TILE_CHOICES, value="auto", label="UNet tile (latent px)")
                with gr.Row():
                    color_fix = gr.Radio(["adain", "wavelet", "none"], value="adain", label="colour fix")
                    dtype_box = gr.Radio(dtypes, value=dtype if dtype in dtypes else "fp32", label="dtype")
                fold = gr.Checkbox(value=fold_shared, label="fold the shared ranks into the base weights")
                run = gr.Button("Upscale", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(
                    label="bicubic | MoR SR", type="filepath", format="png", elem_id="result", max_height=600
                )
                download = gr.File(label="download the SR image", elem_id="download")
                with gr.Row():
                    scores = gr.BarPlot(
                        x="degradation", y="score", y_lim=[0, 1], sort=labels or None, x_label_angle=-30,
                        label="degradation scores (higher = worse)", elem_id="scores",
                    )  # fmt: skip
                    details = gr.Markdown(elem_id="details")
                heatmap = gr.Image(label="active ranks per MoR layer", type="filepath", elem_id="heatmap", height=640)

        def pick(label):
            return str(examples[label]) if label else None

        def upscale(path, scale_v, tile_v, color_v, dtype_v, fold_v, runs, progress=gr.Progress()):  # noqa: B008 - how Gradio asks for a progress bar
            progress(0, desc="loading the model / reading the image")
            tile_size = None if tile_v == "auto" else 0 if tile_v == "off" else int(tile_v)

            def tiles(stage, done, total):
                progress((done, total), desc=f"{stage}: tile", unit="tiles")

            try:
                result = engine.upscale(
                    path, scale=float(scale_v), tile=tile_size, color_fix=color_v, dtype=dtype_v,
                    fold_shared=bool(fold_v), progress=tiles,
                )  # fmt: skip
            except DemoError as e:
                raise gr.Error(str(e), print_exception=False) from None
            except Exception as e:  # noqa: BLE001 - anything else is still a message on the page
                raise gr.Error(f"{type(e).__name__}: {e}", print_exception=False) from None
            label = Path(path).name
            runs = [*runs, (label, result)][-HISTORY:]
            heat = save_heatmap(runs, result.sr.parent / "heatmap.png")
            frame = pd.DataFrame({"degradation": list(result.scores), "score": list(result.scores.values())})
            names = [r for r, _ in runs]
            return (
                (str(result.bicubic), str(result.sr)),
                str(result.sr),
                frame,
                str(heat),
                _details(result, names),
                runs,
            )

        example.change(pick, inputs=example, outputs=image)
        run.click(
            upscale,
            inputs=[image, scale, tile, color_fix, dtype_box, fold, history],
            outputs=[slider, download, scores, heatmap, details, history],
            concurrency_limit=1,  # one model, one job at a time; others wait in the queue
        )
    return demo
