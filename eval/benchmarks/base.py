"""`Benchmark`, what every `--task` of `eval.generate` is, the `Job`s it turns into files, and the layout most share:
`<out>/<idx:05d>/samples/<k:04d>.png` + `metadata.jsonl` (GenEval's, the one its scorer reads), written atomically,
the metadata last, so a prompt is finished when its `metadata.jsonl` is in place.

Every file a benchmark writes is `output_file(out, ...)`: a job's name is a plain file name (`check_job_names`) and the
path must stay inside `--out` (no symlink out). Prompt files are read with `read_prompt_file`: UTF-8, else one line
naming the file and the first bad byte."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from eval.scorers import MissingScorerError
from models.core.contained_path import resolve_inside, safe_file_name
from models.core.sampling import Preset, SamplingConfig

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "eval_prompts"


@dataclass
class Job:
    """One prompt (or class) and the files it produces."""

    index: int  # its place in the benchmark: seeds its images
    name: str  # folder / file stem
    condition: str | int  # what the family's generator samples: a prompt (t2i) or a class id (c2i)
    meta: dict


def output_file(out: Path, *parts: str) -> Path:
    """`out/parts...`, refused (ValueError, one line) unless it stays inside `out`, symlinks followed."""
    return resolve_inside(out, Path(*parts), "output file")


def check_job_names(jobs: list[Job]) -> list[Job]:
    """`jobs`, once every name is a plain file name (what `safe_file_name` keeps) and no two are the same."""
    seen: set[str] = set()
    for job in jobs:
        if safe_file_name(job.name) != job.name:
            raise ValueError(
                f"prompt {job.index} is named {job.name!r}, not a plain file name (letters, digits, '.', '_', '-'; "
                "at most 120); rename it in the prompt file"
            )
        if job.name in seen:
            raise ValueError(f"two prompts are named {job.name!r}; every prompt needs its own name")
        seen.add(job.name)
    return jobs


def read_prompt_file(path: Path, what: str = "--prompts-file") -> str:
    """The text of a prompt file; a one-line ValueError when it is missing, unreadable or not UTF-8."""
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"{what} {path} {problem}; pass an existing --prompts-file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror or err}); pass a readable file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {path} is not UTF-8 text: byte offset {err.start} is 0x{data[err.start]:02x}; save it as UTF-8"
        ) from None


def read_metadata_file(path: Path, what: str) -> list[dict]:
    """GenEval-style prompt metadata: UTF-8 JSON lines, each an object with a "prompt" (blank lines skipped); a
    one-line ValueError naming the line otherwise."""
    metas = []
    for n, line in enumerate(read_prompt_file(path, what).splitlines(), 1):
        try:
            meta = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} {path} line {n} is not JSON ({err}); one object a line") from None
        if meta is None:
            continue
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
            raise ValueError(f'{what} {path} line {n} has no "prompt" text; one object a line')
        metas.append(meta)
    return metas


def save_png_atomic(img: np.ndarray | Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(tmp)
    os.replace(tmp, path)


def per_tag_table(result: dict) -> list[str]:
    """The report table of a GenEval-style result: accuracy per tag, the overall score and the chance level."""
    lines = ["| tag | accuracy |", "| --- | --- |"]
    lines += [f"| {tag} | {acc:.3f} |" for tag, acc in result["per_tag"].items()]
    lines.append(f"| **overall (mean of tags)** | **{result.get('overall', float('nan')):.3f}** |")
    chance = result.get("chance")
    if isinstance(chance, dict) and "overall" in chance:
        lines.append(f"| chance (mean of tags) | {chance['overall']:.3f} |")
    return lines


class Benchmark:
    """One `--task`: a subclass sets `family` and defines `load_jobs`; the rest defaults to the folder layout, no
    flags of its own, no finishing step, no in-process scorer and a metric | value report table."""

    family: str  # the models.family.FAMILIES entry whose generator samples it: "t2i" (prompts), "c2i" (class ids)
    scorer: str | None = None  # the command that scores a generated folder `{out}` (eval.report shows it)
    score_key = "overall"  # the headline number of `score`'s result (eval.watch logs it as watch/score)

    def __init__(self, name: str) -> None:
        self.name = name

    def add_arguments(self, flags) -> None:
        """Adds its own flags to `flags` (an argument group); given with another --task they are an error."""

    def check(self, p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Checks its flags (`p.error`), once the model flags and the sampler settings are resolved."""

    def sampling(self, preset: Preset, args: argparse.Namespace) -> SamplingConfig:
        """The published settings of `preset` for this benchmark."""
        return preset.sampling_for(self.name)

    def load_jobs(self, args: argparse.Namespace) -> list[Job]:
        """Every job of the benchmark, in order (`--limit` keeps the first ones)."""
        raise NotImplementedError(f"{type(self).__name__} must define load_jobs(args) -> list[Job]")

    def is_done(self, job: Job, out: Path) -> bool:
        return output_file(out, job.name, "metadata.jsonl").is_file()  # written after all samples

    def write_job(self, job: Job, images: list[np.ndarray], out: Path) -> None:
        for k, img in enumerate(images):
            save_png_atomic(img, output_file(out, job.name, "samples", f"{k:04d}.png"))
        meta = output_file(out, job.name, "metadata.jsonl")
        tmp = meta.with_name(".metadata.jsonl.tmp")
        tmp.write_text(json.dumps(job.meta) + "\n")
        os.replace(tmp, meta)

    def finish(self, jobs: list[Job], out: Path) -> None:
        """Runs on rank 0 once every rank has written its jobs: files made from all of them (none by default)."""

    def sample_cells(self, out: Path, limit: int) -> list[tuple[Path, str]]:
        """(image, caption) pairs for the report's sample grid."""
        cells = []
        for meta in sorted(out.glob("*/metadata.jsonl"))[:limit]:
            prompt = json.loads(meta.read_text().splitlines()[0])["prompt"]
            cells.append((meta.parent / "samples" / "0000.png", prompt))
        return cells

    def score_table(self, result: dict) -> list[str]:
        """The report's table of its entry in summary.json."""
        return metric_table(result)

    def add_scorer_arguments(self, flags) -> None:
        """Adds the flags `score` reads to `flags` (an argument group of eval.watch; given with another --task they
        are an error)."""

    def scorer_problem(self, args: argparse.Namespace) -> str | None:
        """None when `score` can run here with `args`, else one line naming what to install or pass."""
        return f"--task {self.name} has no scorer; pick a task that has one"

    def score(self, out: Path, args: argparse.Namespace) -> dict:
        """The scores of a folder it generated, computed in this process (eval.watch), `score_key` among them."""
        raise MissingScorerError(self.scorer_problem(args) or f"--task {self.name} defines no score(out, args)")


def metric_table(result: dict) -> list[str]:
    """One row per metric of a result."""
    if not isinstance(result, dict):
        return []
    lines = ["| metric | value |", "| --- | --- |"]
    return lines + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
