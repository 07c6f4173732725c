"""The Gradio page of a session and its server: the request fields with the model's defaults, a Generate button
whose event runs one request at a time (the queue), a progress bar over the next-patch steps, the gallery with each
image's settings, the files to download, and a status line that says what went wrong (the server keeps serving).

No network: analytics are off, no share link, the theme's fonts are served locally; bound to 127.0.0.1 unless asked.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no version check either

import gradio as gr  # noqa: E402

from eval.app.outputs import save_results  # noqa: E402
from eval.app.session import MAX_CFG, MAX_STEPS, InputError, Request, Session  # noqa: E402
from models.core.sampling import CFG_SCHEDULES  # noqa: E402
from training.cli_errors import first_line  # noqa: E402

DEFAULT_IMAGES = 4
PROGRESS = gr.Progress()  # a parameter defaulting to it gets each event's progress bar (gradio makes a new one)


def condition_field(session: Session) -> gr.components.Component:
    """A text box for prompts, a dropdown (that also takes a typed index or name) for classes."""
    c = session.condition
    if hasattr(c, "choices"):
        return gr.Dropdown(c.choices, value=c.default, allow_custom_value=True, label=c.label, elem_id="condition")
    return gr.Textbox(value=c.default, label=f"{c.label} (at most {c.budget} tokens)", lines=3, elem_id="condition")


def build_page(session: Session, out: Path) -> gr.Blocks:
    """The page of `session`; generated files go to new folders under `out`."""
    c, d = session.condition, session.sampling
    with gr.Blocks(title="BitDance playground", analytics_enabled=False) as page:
        gr.Markdown(f"## BitDance playground\n{session.title}")
        with gr.Row():
            with gr.Column(scale=1):
                condition = condition_field(session)
                size = gr.Dropdown(
                    c.sizes or [c.default_size],
                    value=c.default_size,
                    label="Image size (HxW)",
                    interactive=bool(c.sizes),
                    elem_id="size",
                )
                count = gr.Number(
                    min(DEFAULT_IMAGES, session.max_images),
                    precision=0,
                    elem_id="count",
                    label=f"Number of images (1-{session.max_images})",
                )
                seed = gr.Number(0, precision=0, label="Seed (image k uses image_seed(seed, 0, k))", elem_id="seed")
                steps = gr.Number(d.steps, precision=0, label=f"Steps per patch (1-{MAX_STEPS})", elem_id="steps")
                cfg = gr.Number(d.cfg_scale, label=f"CFG scale (0-{MAX_CFG:g}; <= 1: no guidance)", elem_id="cfg")
                schedule = gr.Dropdown(
                    list(CFG_SCHEDULES), value=d.cfg_schedule, label="CFG schedule", elem_id="schedule"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("Ready.", elem_id="status")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", format="png", elem_id="gallery")
                files = gr.File(
                    label="Download: PNGs (settings in their text chunks) and settings.json",
                    file_count="multiple",
                    elem_id="downloads",
                )

        def run(
            condition_value,
            count_value,
            seed_value,
            steps_value,
            cfg_value,
            schedule_value,
            size_value,
            progress=PROGRESS,
        ):
            request = Request(
                condition_value, count_value, seed_value, steps_value, cfg_value, schedule_value, size_value
            )
            start = time.perf_counter()
            try:
                results = session.generate(request, lambda fraction, what: progress(fraction, desc=what))
                paths = save_results(results, out)
            except InputError as err:
                gr.Warning(str(err))
                return gr.skip(), gr.skip(), f"Not generated: {err}"
            except Exception as err:  # noqa: BLE001 (said on the page and logged; the server goes on)
                traceback.print_exc(file=sys.stderr)
                gr.Warning(f"generation failed: {first_line(err)}")
                return gr.skip(), gr.skip(), f"Generation failed: {first_line(err)}"
            seconds = time.perf_counter() - start
            shown = [(str(p), r.caption) for p, r in zip(paths, results, strict=False)]
            return shown, [str(p) for p in paths], f"Generated {len(results)} image(s) in {seconds:.1f} s."

        fields = [condition, count, seed, steps, cfg, schedule, size]  # in Request's order
        button.click(
            run, fields, [gallery, files, status], api_name="generate", concurrency_limit=1, concurrency_id="generate"
        )
    return page


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(session: Session, out: Path, host: str, port: int, queue_size: int) -> None:
    """Serves the page until interrupted; prints `Running on http://HOST:PORT` once it answers."""
    page = build_page(session, out)
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    port = port or free_port(host)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        allowed_paths=[str(out)],
        show_error=True,
    )
    print(f"Running on http://{host}:{port}", flush=True)
    page.block_thread()
