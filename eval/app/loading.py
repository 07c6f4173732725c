"""What `--model` names and the family generator that loads it (the one `eval.generate` uses), with the sampler
defaults resolved the way `eval.generate` resolves them (`resolve_sampling`: the preset, then explicit flags).

`--model` is a training run folder (it has `checkpoints/`: its latest checkpoint's EMA is exported once, by the
engine that wrote it, into `<run>/app/<step>/model`, and the run's `model.kind` is the family), an official-layout
folder or a checkpoint file. The family is then `--family`, else the first family of `models.family.FAMILIES` with a
generator whose generator takes the path; when none does, one line lists each family's reason. Every flag a family's
generator declares (`add_arguments`: image sizes, model config, and whatever options it grows, such as a weights dtype
or offloading) is a flag of the app and reaches the generator unchanged.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.benchmarks.base import Benchmark
from eval.generate import add_inference_arguments, generator_class, load_generator, resolve_sampling, sampling_config
from eval.presets import PRESETS, get_preset
from models.core.sampling import CFG_SCHEDULES
from models.family import FAMILIES
from training.checkpoint import checkpoint_root, latest_checkpoint
from training.cli_errors import debug_requested, first_line
from training.engines.export import read_trainer_json

CACHE = "app"  # the export cache inside a run folder: <run>/app/<step>/model


class RaisingParser(argparse.ArgumentParser):
    """The parser `resolve_sampling` reports through: its errors are ValueErrors (one line), not an exit."""

    def error(self, message: str):
        raise ValueError(message)


class Playground(Benchmark):
    """The page as `resolve_sampling` sees it: free conditions of one family, sampled with the preset's base
    settings (no benchmark's own guidance weight)."""

    def __init__(self, family: str) -> None:
        super().__init__("app")
        self.family = family


@dataclass
class Loaded:
    """A model loaded once: its family, the family's generator, and the resolved flags (preset, sampler defaults,
    the family's own flags) it was loaded with."""

    family: str
    generator: object
    args: argparse.Namespace
    source: str  # what --model named


def sampling_families() -> list[str]:
    """The families that have a generator (the ones a playground can sample), in registry order."""
    return [name for name, family in FAMILIES.items() if family.generator is not None]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --family, the sampler defaults, the run-folder export's tokenizers and every family's own flags."""
    p.add_argument(
        "--model", required=True, help="official-layout T2I folder, class-conditional checkpoint, or run dir"
    )
    p.add_argument("--family", choices=sampling_families(), help="the model family (default: found from --model)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="published defaults (default: the model's, if recognised)")
    p.add_argument("--steps", type=int, help="default diffusion-head steps (default: the preset's)")
    p.add_argument("--cfg-scale", type=float, help="default guidance weight (default: the preset's)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="default guidance schedule (default: the preset's)")
    p.add_argument("--text-tokenizer", help="run dir: the text tokenizer folder (default: the run's config)")
    p.add_argument("--image-tokenizer", help="run dir: the image tokenizer weights (default: the run's config)")
    add_inference_arguments(p)
    for name in sampling_families():
        generator_class(name).add_arguments(p.add_argument_group(f"{name} models"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def is_run_dir(path: Path) -> bool:
    return checkpoint_root(path).is_dir()


def run_tokenizers(args: argparse.Namespace, config: dict) -> tuple[Path, Path]:
    """(text, image) tokenizers of a run's export: the flags, else the run's `model.*_tokenizer`."""
    paths = []
    for kind in ("text", "image"):
        path = getattr(args, f"{kind}_tokenizer") or config["model"].get(f"{kind}_tokenizer")
        if not path or not Path(path).exists():
            what = f"{kind} tokenizer {path} does not exist" if path else f"the run names no {kind} tokenizer"
            raise ValueError(f"{what}; pass --{kind}-tokenizer")
        paths.append(Path(path))
    return paths[0], paths[1]


def export_run(run_dir: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    """(the official-layout folder of the run's latest checkpoint, the run's config): exported once by the engine
    that wrote it (in a child process, as eval.watch does) into `<run>/app/<step>/model`, reused afterwards."""
    from eval.watch.loop import export_in_child

    checkpoint = latest_checkpoint(run_dir, quiet=True)
    if checkpoint is None:
        raise ValueError(f"--model {run_dir} is a run folder without a complete checkpoint yet; wait for one")
    config = read_trainer_json(checkpoint)["config"]
    dst = run_dir / CACHE / checkpoint.name / "model"
    if dst.is_dir():
        print(f"using the export of {checkpoint} in {dst}", flush=True)
        return dst, config
    text, image = run_tokenizers(args, config)
    tmp = dst.with_name(f"model.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    print(f"exporting the EMA weights of {checkpoint} to {dst} (once)", flush=True)
    try:
        export_in_child(checkpoint, tmp, text, image)
        os.rename(tmp, dst)
    except OSError:
        if not dst.is_dir():  # not another app exporting the same checkpoint at the same time
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst, config


def adopt_run_config(args: argparse.Namespace, config: dict) -> list[str]:
    """The run's family as the only candidate; its model config's image sizes when the flags list none."""
    kind = config["model"]["kind"]
    family = FAMILIES.get(kind)
    if family.generator is None:
        raise ValueError(f"--model is a run of {kind} models; the playground samples {', '.join(sampling_families())}")
    if args.family is not None and args.family != kind:
        raise ValueError(f"--family {args.family}, but the run trains {kind} models")
    try:
        sizes = getattr(family.get_config(config["model"]["name"]), "image_sizes", None)
    except ValueError:  # a config name only the run's own code knows: the flags' sizes
        sizes = None
    if sizes and hasattr(args, "image_size") and args.image_size is None:
        args.image_size = [tuple(s) for s in sizes]
    return [kind]


def fit_start_size(args: argparse.Namespace) -> None:
    """The start-up image size (a family's --height/--width, where it has them) is the first listed --image-size
    when the given one is not listed; the page offers every listed size."""
    sizes = getattr(args, "image_size", None)
    if sizes and (args.height, args.width) not in sizes:
        args.height, args.width = sizes[0]


def resolve(args: argparse.Namespace, family: str) -> None:
    """The family's generator checks its flags; the preset and sampler defaults are set as eval.generate sets them."""
    if args.preset is not None and get_preset(args.preset).family != family:
        raise ValueError(f"--preset {args.preset} is a {get_preset(args.preset).family} model, not a {family} one")
    resolve_sampling(RaisingParser(prog="python -m eval.app"), args, Playground(family))
    sampling_config(args)  # a bad --steps / --cfg-schedule fails here, in one line


def load_model(args: argparse.Namespace, device: torch.device) -> Loaded:
    """The model `--model` names, loaded once by its family's generator; a one-line ValueError when nothing loads."""
    path = Path(args.model)
    if not path.exists():
        raise ValueError(f"--model {path} does not exist; pass an official-layout folder, a checkpoint or a run dir")
    source = str(path)
    families = [args.family] if args.family else sampling_families()
    args = argparse.Namespace(**vars(args))
    if is_run_dir(path):
        folder, config = export_run(path, args)
        families = adopt_run_config(args, config)
        args.model, source = str(folder), f"{path} {folder.parent.name}"
    fit_start_size(args)
    reasons = []
    for family in families:
        trial = argparse.Namespace(**vars(args))
        try:
            resolve(trial, family)
            generator = load_generator(family, trial, device)
        except (Exception, SystemExit) as err:  # noqa: BLE001 (each family's reason is reported, in one line)
            if debug_requested():
                traceback.print_exc(file=sys.stderr)
            reasons.append((family, first_line(err)))
            continue
        return Loaded(family, generator, trial, source)
    if len(reasons) == 1:
        raise ValueError(f"--model {source} does not load as a {reasons[0][0]} model: {reasons[0][1]}")
    listed = "; ".join(f"{family}: {why}" for family, why in reasons)
    raise ValueError(f"--model {source} loads as no model family ({listed}); pass --family to see one reason")
