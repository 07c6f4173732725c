"""The model loaded once and one request through it, without gradio: the page's defaults, the checks of a request
(each failure an `InputError` the page shows), and the images with their settings.

Images come from `eval.generate.sample_images`, so image k of a request with seed S is drawn from
`image_seed(S, 0, k)`: the same image as `eval.generate --task prompts --prompt TEXT --seed S` gives (same sampler
settings and size). How a family is conditioned is found from its generator, not its name: one with a text
tokenizer (`.text`) takes prompts at the model's image sizes, one whose config counts classes takes a class.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from eval.app.loading import Loaded
from eval.app.progress import patch_progress
from eval.benchmarks import Job
from eval.generate import image_seed, sample_images, sampling_config
from models.core.sampling import CFG_SCHEDULES, SamplingConfig

MAX_STEPS = 1000  # diffusion-head steps per patch a request may ask for
MAX_CFG = 50.0  # guidance weights a request may ask for: [0, MAX_CFG] (<= 1: no guidance)
SEEDS = 2**63  # seeds a request may ask for: [0, SEEDS)

Progress = Callable[[float, str], None]  # (fraction done, what is running)


class InputError(ValueError):
    """A request the page refuses, with the one line that says what to change."""


@dataclass(frozen=True)
class Request:
    """One press of Generate, as the page's fields give it (unchecked)."""

    condition: object  # a prompt, or a class (an index, a name, or "index: name")
    count: object
    seed: object
    steps: object
    cfg_scale: object
    cfg_schedule: object
    size: object = None  # "HxW", for models with several sizes


@dataclass
class Result:
    """One generated image and the settings that made it."""

    pixels: np.ndarray  # uint8 [H, W, 3]
    settings: dict
    caption: str


def whole(value, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high), else an InputError naming the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and low <= number < high):
        raise InputError(f"{what} must be a whole number from {low} to {high - 1}, got {value!r}")
    return int(number)


class PromptCondition:
    """Prompts of a text-to-image generator (it has a text tokenizer), at the model's image sizes that its text
    tokenizer has resolution tokens for, each prompt within the text budget: the backbone's positions less those of
    the largest image (or `max_tokens`, when lower)."""

    label = "Prompt"
    key = "prompt"

    @staticmethod
    def fits(generator) -> bool:
        return hasattr(generator, "text")

    def __init__(self, generator, max_tokens: int | None = None, class_names: Path | None = None):
        if class_names is not None:
            raise ValueError("--class-names goes with class-conditional models; this one takes prompts")
        self.generator = generator
        cfg = generator.model.cfg
        image_tokens = {}  # "HxW" -> positions its image takes after the prompt
        for h, w in cfg.image_sizes:
            gh, gw = cfg.grid(h, w)
            try:
                image_tokens[f"{h}x{w}"] = len(generator.text.image_prefix_ids(gh, gw)) + gh * gw
            except ValueError:  # a grid side beyond the tokenizer's <|res_k|> tokens
                continue
        self.sizes = list(image_tokens)
        self.default = "a photo of a cat"
        self.default_size = f"{generator.height}x{generator.width}"
        if self.default_size not in image_tokens:
            listed = ", ".join(self.sizes) or "none"
            raise ValueError(
                f"image size {self.default_size} is beyond the model's text tokenizer (sizes it can take: {listed}); "
                "list the model's sizes with --image-size HxW"
            )
        self.budget = cfg.llm.max_position_embeddings - max(image_tokens.values())
        if max_tokens is not None:
            self.budget = min(self.budget, max_tokens)
        if self.budget < 1:
            raise ValueError("the largest image size leaves no positions for a prompt; list smaller --image-size")

    def parse(self, value) -> str:
        text = str(value or "").strip()
        if not text:
            raise InputError("the prompt is empty; describe the image to generate")
        tokens = len(self.generator.text.prompt_ids(text))
        if tokens > self.budget:
            raise InputError(f"the prompt is {tokens} tokens long, over the text budget of {self.budget}; shorten it")
        return text

    def describe(self, condition: str) -> str:
        return condition

    def parse_size(self, size) -> str:
        """A size of the model as "HxW" (the start-up size when none is given)."""
        size = str(size or self.default_size)
        if size not in self.sizes:
            raise InputError(f"image size {size} is not one of the model's: {', '.join(self.sizes)}")
        return size

    def use_size(self, size: str) -> None:
        """Sets the generator's image size for the next sampler calls."""
        self.generator.height, self.generator.width = (int(v) for v in size.split("x"))


class ClassCondition:
    """Class ids of a class-conditional generator (its config counts `num_classes`), typed as an index, a name from
    `--class-names` or "index: name"; its one image size is the model's."""

    label = "Class"
    key = "class"

    @staticmethod
    def fits(generator) -> bool:
        return hasattr(getattr(getattr(generator, "model", None), "cfg", None), "num_classes")

    def __init__(self, generator, max_tokens: int | None = None, class_names: Path | None = None):
        if max_tokens is not None:
            raise ValueError("--max-prompt-tokens goes with text-to-image models; this one takes classes")
        cfg = generator.model.cfg
        self.names = read_class_names(class_names, cfg.num_classes)
        self.choices = [f"{i}: {name}" for i, name in enumerate(self.names)]
        self.default = self.choices[0]
        self.sizes = []
        self.default_size = f"{cfg.image_size}x{cfg.image_size}"

    def parse(self, value) -> int:
        text = str(value if value is not None else "").strip()
        head = text.split(":", 1)[0].strip()
        if head.isdigit() and int(head) < len(self.names):
            return int(head)
        if text in self.names:
            return self.names.index(text)
        raise InputError(f"unknown class {text!r}; pick one of the list (an index from 0 to {len(self.names) - 1})")

    def describe(self, condition: int) -> str:
        return self.choices[condition]

    def parse_size(self, size) -> str:
        return self.default_size

    def use_size(self, size: str) -> None:
        """The model has one size."""


CONDITIONS = (PromptCondition, ClassCondition)


def read_class_names(path: Path | None, count: int) -> list[str]:
    """`count` class names: from a JSON file ({"0": name} or {"0": [wnid, name]}, as ImageNet's class index) or a
    text file (one name a line), else "class k"."""
    if path is None:
        return [f"class {k}" for k in range(count)]
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        entries = json.loads(text)
        names = [entries.get(str(k), f"class {k}") for k in range(count)]
        names = [n[-1] if isinstance(n, list) else str(n) for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"--class-names {path} lists {len(names)} names; the model has {count} classes")
    return names


class Session:
    """The loaded model, its conditioning, its limits and defaults; `generate` runs one request at a time."""

    def __init__(
        self,
        loaded: Loaded,
        device,
        max_images: int = 8,
        batch_size: int = 4,
        max_prompt_tokens: int | None = None,
        class_names: Path | None = None,
    ):
        self.loaded, self.device = loaded, device
        self.max_images, self.batch_size = max_images, batch_size
        kinds = [kind for kind in CONDITIONS if kind.fits(loaded.generator)]
        if not kinds:
            raise ValueError(f"the playground cannot condition a {type(loaded.generator).__name__} model")
        self.condition = kinds[0](loaded.generator, max_prompt_tokens, class_names)
        self.sampling = sampling_config(loaded.args)
        self.lock = threading.Lock()

    @property
    def title(self) -> str:
        preset = self.loaded.args.preset
        return f"{self.loaded.source} ({self.loaded.family} model, {f'preset {preset}' if preset else 'no preset'})"

    def check(self, request: Request) -> tuple[object, SamplingConfig, int, int, str]:
        """(condition, sampler settings, number of images, seed, "HxW") of a request; an InputError when one is
        wrong."""
        condition = self.condition.parse(request.condition)
        count = whole(request.count, "the number of images", 1, self.max_images + 1)
        seed = whole(request.seed, "the seed", 0, SEEDS)
        steps = whole(request.steps, "steps", 1, MAX_STEPS + 1)
        try:
            cfg = float(request.cfg_scale)
        except (TypeError, ValueError):
            cfg = math.nan
        if not 0 <= cfg <= MAX_CFG:
            raise InputError(f"the CFG scale must be a number from 0 to {MAX_CFG:g} (<= 1: no guidance)")
        if request.cfg_schedule not in CFG_SCHEDULES:
            raise InputError(f"the CFG schedule must be one of {', '.join(CFG_SCHEDULES)}")
        # the start-up settings (eval.generate's sampling_config: whatever else it carries) with the request's
        sampling = replace(self.sampling, steps=steps, cfg_scale=cfg, cfg_schedule=str(request.cfg_schedule))
        return condition, sampling, count, seed, self.condition.parse_size(request.size)

    def generate(self, request: Request, progress: Progress | None = None) -> list[Result]:
        """The images of a request (an InputError first when it is wrong), `progress` told after every patch of
        every batch."""
        condition, sampling, count, seed, size = self.check(request)
        job = Job(0, "app", condition, {})
        pairs = [(job, k) for k in range(count)]
        batches = [pairs[i : i + self.batch_size] for i in range(0, count, self.batch_size)]
        pixels: list[np.ndarray] = []
        index = 0  # the batch being sampled

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(
                    (index + done / total) / len(batches), f"batch {index + 1}/{len(batches)}: patch {done}/{total}"
                )

        with self.lock:
            self.condition.use_size(size)
            with patch_progress(report):
                for index, batch in enumerate(batches):  # noqa: B007 (report reads it)
                    pixels += sample_images(self.loaded.generator, batch, sampling, seed, self.device)
        return [self.result(px, condition, sampling, seed, k, size) for k, px in enumerate(pixels)]

    def result(self, pixels, condition, sampling: SamplingConfig, seed: int, k: int, size: str) -> Result:
        settings = {
            "model": self.loaded.source,
            "family": self.loaded.family,
            self.condition.key: condition,
            "seed": seed,
            "image": k,
            "noise_seed": image_seed(seed, 0, k),
            "steps": sampling.steps,
            "cfg_scale": sampling.cfg_scale,
            "cfg_schedule": sampling.cfg_schedule,
            "size": size,
            "preset": self.loaded.args.preset,
        }
        caption = (
            f"{self.condition.describe(condition)} | seed {seed} #{k} | {sampling.steps} steps | "
            f"cfg {sampling.cfg_scale:g} {sampling.cfg_schedule} | {size}"
        )
        return Result(pixels, settings, caption)
