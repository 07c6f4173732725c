"""`python -m eval.app --model <official folder | checkpoint | run dir>`: a web playground for one trained model.

The model is loaded once at start-up by its family's generator (the one `eval.generate` uses), with the published
settings of its preset as the page's defaults; each request (prompt or class, images, seed, steps, guidance, size)
is checked, queued (one generation at a time), sampled patch by patch with a progress bar, and shown in a gallery
whose PNG files carry their settings. Bad input gets a message on the page; the server keeps serving.

Modules: `cli` (flags, start-up, the URL line), `loading` (what `--model` names: folder, checkpoint or run dir, and
the generator that loads it), `session` (the loaded model, request checks and generation; no gradio), `progress`
(a per-patch callback around the shared next-patch loop), `outputs` (PNG files with their settings), `page` (the
Gradio page), `browser` (the app as a subprocess and a headless Chromium, for tests and screenshots), `screenshot`
(a PNG of the page serving a model).
"""
