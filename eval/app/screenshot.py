"""`python -m eval.app.screenshot --model PATH --out docs/app.png [--prompt TEXT] [-- APP FLAGS]`: a PNG of the page
serving a model, after one generation, for the README (`make demo` first, then `--model runs/demo/t2i`).

By default it generates the first prompt of the demo's shapes benchmark with the demo's sampler settings
(`cluster.demo.config.DemoConfig`); flags after `--` go to `python -m eval.app` (they win over those defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.app.browser import Page, app_server, browser_problem, headless_chromium
from training.cli_errors import add_debug_flag, one_line_errors

PROG = "python -m eval.app.screenshot"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="what python -m eval.app --model takes (e.g. runs/demo/t2i)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--prompt", help="default: the first prompt of the demo's shapes benchmark")
    p.add_argument("--images", type=int, default=4, help="images to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", default="1400x1000", help="browser window WxH")
    add_debug_flag(p)
    p.add_argument("app_flags", nargs=argparse.REMAINDER, help="-- then more flags of python -m eval.app")
    args = p.parse_args(argv)
    problem = browser_problem()
    if problem:
        p.error(problem)
    from cluster.demo.config import DemoConfig
    from eval.shapes_bench import shapes_prompts

    demo = DemoConfig()
    prompt = args.prompt or shapes_prompts(demo.seed, 1)[0]["prompt"]
    s = demo.sampling
    flags = ["--model", args.model, "--steps", str(s.steps), "--cfg-scale", str(s.cfg_scale)]
    flags += ["--cfg-schedule", s.cfg_schedule, *[f for f in args.app_flags if f != "--"]]
    width, height = (int(v) for v in args.window.lower().split("x"))
    with one_line_errors(PROG, args.debug, (OSError, ValueError, RuntimeError)):
        with app_server(flags) as server, headless_chromium(width, height) as driver:
            page = Page(driver, server.url)
            page.type_into("condition", prompt)
            page.type_into("count", str(args.images))
            page.type_into("seed", str(args.seed))
            page.generate("Generated")
            page.gallery_sizes(args.images)
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
    print(f"wrote {out} ({prompt!r} on {args.model})", flush=True)


if __name__ == "__main__":
    main()
