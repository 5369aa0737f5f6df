"""``mor-sr demo --model DIR|ID|tiny``: the Gradio page (:mod:`mor_model.demo`) on this machine.

Binds to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public Gradio link) is never on by
default. Uploads, examples and results live in one temporary folder, deleted when the server stops.
Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path

from .common import (
    EXIT_OK,
    EXIT_USAGE,
    add_model_args,
    device_problem,
    err,
    keep_freed_memory_on_cpu,
    positive_int,
    resolve_sources,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a web page (Gradio) to try the model: SR image, degradation scores, active ranks per layer",
        description="Starts a local web page: upload an image or pick an example (scikit-image photos degraded "
        "at three severities), get the SR image next to the bicubic upscale, the seven degradation scores, the "
        "active ranks per MoR layer (a heatmap over the last runs), seconds per stage and the mor_kernels backend. "
        "--model tiny builds the tiny random model in ./tiny if it is missing (no weights needed). Needs the "
        "demo extra: pip install 'mor-sr[demo]'. Uploads and results stay in a temporary folder that is deleted "
        "when the server stops (Ctrl-C).",
    )
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=port_arg, default=7860, help="port, 0 to 65535 (default 7860; 0: any free port)")
    g.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off by default; needs the network)"
    )
    g.add_argument(
        "--max-pixels",
        type=positive_int,
        default=512 * 512,
        help="largest input image the page accepts, width x height (default 262144 = 512x512), checked from the "
        "file's header before decoding",
    )
    g.add_argument(
        "--max-file-size", type=positive_int, default=32, metavar="MB", help="largest upload in MB (default 32)"
    )
    g.add_argument("--no-examples", action="store_true", help="do not offer the example images")


def port_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0 to 65535, got {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0 to 65535, got {n}")
    return n


def _stop(signum, frame):
    raise KeyboardInterrupt


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args) -> int:
    problem = device_problem(args.device)
    if problem:
        err(problem)
        return EXIT_USAGE
    if args.model == "tiny" and not Path("tiny").exists():
        from ..testing import tiny_model

        print("building the tiny random model in ./tiny (no weights needed; the outputs are meaningless)")
        tiny_model("tiny")
    try:
        resolve_sources(args)
    except (FileNotFoundError, ValueError) as e:
        err(str(e))
        return EXIT_USAGE
    work = Path(tempfile.mkdtemp(prefix="mor-sr-demo-"))
    previous = signal.signal(signal.SIGTERM, _stop)  # `kill` cleans up too, like Ctrl-C (restored below)
    # before gradio is imported: some of its modules read these at import time
    os.environ["GRADIO_TEMP_DIR"] = str(work / "uploads")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        try:
            import gradio  # noqa: F401
        except ImportError as e:
            err(f"the demo needs Gradio ({e}): pip install 'mor-sr[demo]'")
            return EXIT_USAGE
        from ..demo.app import build_demo
        from ..demo.engine import DemoEngine
        from ..demo.examples import make_examples

        engine = DemoEngine(
            args.model,
            work_dir=work,
            adapter=args.adapter,
            vae_adapter=args.vae_adapter,
            clip=args.clip,
            device=args.device,
            backend=args.backend,
            max_pixels=args.max_pixels,
        )
        keep_freed_memory_on_cpu(args.device)  # this process serves one model for its life
        try:
            engine.pipeline(args.dtype, args.fold_shared)  # load now: a broken model fails here, not on the page
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            err(f"cannot load the model: {e}")
            return EXIT_USAGE
        examples = {} if args.no_examples else make_examples(work / "examples")
        demo = build_demo(engine, examples, dtype=args.dtype, fold_shared=args.fold_shared)
        port = args.port or _free_port(args.host)
        print(f"mor-sr demo on http://{args.host}:{port} (temporary files in {work}; Ctrl-C stops)", flush=True)
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host,
            server_port=port,
            share=bool(args.share),
            max_file_size=args.max_file_size * 1024 * 1024,
            allowed_paths=[str(work)],
            show_error=True,
            ssr_mode=False,
            quiet=False,
            footer_links=[],
        )
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
    return EXIT_OK
