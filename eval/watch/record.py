"""What a watched checkpoint leaves behind: its row in `<run_dir>/metrics.jsonl` (the record that it is done), its
sample grid `<run_dir>/samples/watch_<step>.png` and its entry in the run's wandb run (see eval/watch/__init__.py)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from eval.benchmarks import Benchmark

PREFIX = "watch/"
GRID_CELLS = 16


class MetricsLog:
    """`<run_dir>/metrics.jsonl`, which the trainer appends to at the same time: read incrementally (complete lines
    only) for the watcher's rows, appended one whole row per `os.write` on an O_APPEND descriptor."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = 0
        self.done: set[tuple[str, int]] = set()  # (task, step) of every watcher row

    def refresh(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
        self.offset += end
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a torn line of a writer that died mid-write
                continue
            if isinstance(row, dict) and f"{PREFIX}task" in row:
                self.done.add((row[f"{PREFIX}task"], int(row["step"])))

    def is_done(self, task: str, step: int) -> bool:
        return (task, step) in self.done

    def append(self, row: dict) -> None:
        line = (json.dumps(row) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written != len(line):
            raise OSError(f"{self.path}: wrote {written} of {len(line)} bytes of a row; check the disk")
        self.done.add((row[f"{PREFIX}task"], int(row["step"])))


def flatten(value, prefix: str = PREFIX) -> dict[str, float]:
    """The finite numbers of a scorer's result, keyed by their path (`watch/per_tag/colors`)."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return {}
    return {prefix.rstrip("/"): value}


def scores_row(task: str, step: int, checkpoint: str, result: dict, score_key: str, extra: dict) -> dict:
    """The metrics.jsonl row of one evaluated checkpoint: its step, `watch/score` (the benchmark's headline), every
    number of the result, and `extra` (grid path, seconds)."""
    return {
        "step": step,
        f"{PREFIX}task": task,
        f"{PREFIX}checkpoint": checkpoint,
        f"{PREFIX}step": step,
        f"{PREFIX}score": result[score_key],
        **flatten(result),
        **{f"{PREFIX}{k}": v for k, v in extra.items()},
    }


def save_grid(bench: Benchmark, out: Path, path: Path) -> Path:
    """A captioned grid of the first samples (the benchmark's layout, `eval.report`'s grid), written atomically."""
    from eval.report import captioned_grid

    cells = bench.sample_cells(out, GRID_CELLS)
    if not cells:
        raise FileNotFoundError(f"no samples in {out} for the grid")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    captioned_grid(cells).save(tmp)
    os.replace(tmp, path)
    return path


# ---- wandb ---------------------------------------------------------------------------------------------------------


class WandbLog:
    """The run's wandb run as a second writer: one short wandb run per checkpoint (init, log, finish, so the entry is
    on disk or sent before its metrics.jsonl row is written), shared mode online, offline otherwise."""

    def __init__(self, run_dir: Path, logging: dict, folder: Path):
        mode = logging.get("wandb", "auto")
        self.mode = ("online" if os.environ.get("WANDB_API_KEY") else "offline") if mode == "auto" else mode
        id_file = Path(run_dir) / "wandb_id.txt"
        self.run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.project, self.folder = logging.get("project", "bitdance"), folder

    @property
    def off(self) -> str | None:
        """Why nothing goes to wandb, or None."""
        if self.mode == "disabled":
            return "the run logs no wandb (logging.wandb=disabled)"
        return None if self.run_id else "the run has no wandb_id.txt (its trainer has not started wandb)"

    def log(self, step: int, row: dict, grid: Path) -> str:
        """Logs `row` (and the grid) at watch/step = `step`; says what it did."""
        if self.off:
            return f"not logged to wandb: {self.off}"
        folder = self.folder / f"step_{step:08d}"
        if self.mode == "offline" and any(r.get(f"{PREFIX}step") == step for r in offline_history(folder)):
            return "already in the offline wandb run"  # written before a crash, the metrics row not yet
        import wandb

        settings = wandb.Settings(
            console="off", silent=True, x_label="watch", x_primary=False, x_update_finish_state=False
        )
        mode = "shared" if self.mode == "online" else self.mode
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=self.project, id=self.run_id, resume="allow", dir=str(folder), mode=mode, settings=settings
        )
        run.define_metric(f"{PREFIX}step")
        run.define_metric(f"{PREFIX}*", step_metric=f"{PREFIX}step")
        values = {k: v for k, v in row.items() if k.startswith(PREFIX)}
        run.log({**values, f"{PREFIX}samples": wandb.Image(str(grid))})
        run.finish()
        return f"logged to wandb run {self.run_id} ({self.mode})"


BLOCK = 32768  # the .wandb file: a LevelDB log (7-byte header, then records in 32 KiB blocks) of protobuf Records


def wandb_records(path: Path):
    """The protobuf `Record`s of a `.wandb` file, stopping at a record a killed writer left incomplete."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a .wandb file")
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # a zero-filled block tail
            pos += BLOCK - pos % BLOCK
            continue
        if pos + 7 + length > len(data):
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL / FIRST start a record, MIDDLE / LAST continue
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def offline_history(folder: Path) -> list[dict]:
    """The history rows of every offline wandb run under `folder`, values decoded from JSON."""
    rows = []
    for path in sorted(Path(folder).rglob("*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows
