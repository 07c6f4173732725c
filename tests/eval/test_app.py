"""`python -m eval.app` in a real headless Chromium: a tiny official-layout T2I folder served on 127.0.0.1, a prompt
typed and generated (the gallery shows images of the model's size, the files carry their settings), and bad input
(an over-long prompt, out-of-range steps) answered on the page while the server goes on serving. In-process: the
progress callback hears every patch and the images are eval.generate's; a bad --model is one line.

The browser tests need the system Chromium and chromedriver: skipped without them, failed instead when
BITDANCE_REQUIRE_BROWSER=1 (CI).
"""

import os

import numpy as np
import pytest
import torch
from helpers.data import tiny_t2i_folder
from PIL import Image

from eval.app.browser import Page, app_server, browser_problem, headless_chromium
from eval.app.cli import main, parse_args
from eval.app.loading import load_model
from eval.app.outputs import read_settings
from eval.app.session import Request, Session
from eval.benchmarks import Job
from eval.generate import sample_images
from models.core.next_patch import PATCH_DONE
from models.core.sampling import SamplingConfig

MAX_PROMPT_TOKENS = 24  # the server's text budget here, so that an over-long prompt is quick to type


def require_browser() -> None:
    problem = browser_problem()
    try:
        import gradio  # noqa: F401
    except ImportError:
        problem = problem or "gradio is not installed (pip install -e '.[app]')"
    if problem and os.environ.get("BITDANCE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"BITDANCE_REQUIRE_BROWSER=1 but {problem}")
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_t2i_folder(tmp_path_factory.mktemp("appmodel"))


@pytest.fixture(scope="module")
def page(folder, tmp_path_factory):
    """The app on the tiny folder (2 head steps by default) and a browser on its page, shared by the tests."""
    require_browser()
    out = tmp_path_factory.mktemp("appout")
    flags = ["--model", str(folder), "--image-size", "32x32", "--steps", "2", "--cfg-scale", "2", "--out", str(out)]
    with app_server([*flags, "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-images", "4"]) as server:
        with headless_chromium() as driver:
            view = Page(driver, server.url)
            view.out, view.server = out, server
            yield view


@pytest.mark.slow
def test_a_prompt_generates_images_of_the_model_size_with_their_settings(page, tmp_path):
    page.type_into("condition", "a photo of a cat")
    page.type_into("count", "2")
    page.type_into("seed", "7")
    assert page.generate("Generated 2 image(s)").startswith("Generated")
    assert page.gallery_sizes(2) == [(32, 32), (32, 32)]
    assert "a photo of a cat | seed 7 #0 | 2 steps | cfg 2 constant | 32x32" in page.find("#gallery").text
    page.driver.save_screenshot(str(tmp_path / "app.png"))
    assert Image.open(tmp_path / "app.png").size[0] > 0
    pngs = sorted(page.out.glob("*/seed7_*.png"))
    assert [Image.open(p).size for p in pngs] == [(32, 32), (32, 32)]
    settings = read_settings(pngs[1])
    assert (settings["prompt"], settings["seed"], settings["image"], settings["steps"]) == ("a photo of a cat", 7, 1, 2)
    assert (pngs[0].parent / "settings.json").is_file()
    assert page.driver.find_elements("css selector", "#downloads a")  # the files to download


@pytest.mark.slow
def test_bad_input_gets_a_message_and_the_server_keeps_serving(page):
    page.type_into("count", "1")
    page.type_into("condition", " ".join(["a photo of a cat"] * 10))
    status = page.generate("over the text budget")
    assert status.startswith("Not generated: the prompt is") and f"budget of {MAX_PROMPT_TOKENS}" in status, status
    page.type_into("condition", "   ")
    assert page.generate("the prompt is empty").startswith("Not generated")
    page.type_into("condition", "a cat")
    page.type_into("steps", "0")
    assert "steps must be a whole number from 1 to 1000" in page.generate("got 0")
    page.type_into("steps", "5000")
    assert page.generate("got 5000").startswith("Not generated: steps")
    page.type_into("steps", "2")
    page.type_into("count", "9")
    assert page.generate("number of images must be a whole number from 1 to 4").startswith("Not generated")
    page.type_into("count", "1")
    assert page.generate("Generated 1 image(s)").startswith("Generated")
    assert page.server.process.poll() is None
    assert "Traceback" not in page.server.output()


def test_progress_hears_every_patch_and_the_images_are_eval_generates(folder):
    args = parse_args(["--model", str(folder), "--image-size", "32x32", "--steps", "2", "--cfg-scale", "2"])
    cpu = torch.device("cpu")
    session = Session(load_model(args, cpu), cpu, batch_size=1)
    heard = []
    request = Request("a photo of a cat", 2, 5, 2, 2.0, "linear", "32x32")
    results = session.generate(request, lambda fraction, what: heard.append((fraction, what)))
    assert PATCH_DONE.get() is None  # the hook is gone
    patches = 16 * 16 // 4  # a 16x16 token grid, 4 tokens a step
    assert len(heard) == 2 * (patches + 1)  # per batch: after the prefill, then after every patch
    assert [f for f, _ in heard] == sorted(f for f, _ in heard) and heard[0][0] == 0
    assert heard[-1] == (1.0, f"batch 2/2: patch {patches}/{patches}")
    job = Job(0, "app", "a photo of a cat", {})
    sampling = SamplingConfig(steps=2, cfg_scale=2.0, cfg_schedule="linear")
    direct = [sample_images(session.loaded.generator, [(job, k)], sampling, 5, cpu)[0] for k in range(2)]  # 1 a batch
    assert all(np.array_equal(a, r.pixels) for a, r in zip(direct, results, strict=True))
    assert results[1].settings["noise_seed"] != results[0].settings["noise_seed"]


def test_a_bad_model_is_one_line_and_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for model, says in ((tmp_path / "missing", "does not exist"), (junk, "loads as no model family (t2i: ")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(model), "--port", "0"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err and says in err, err
