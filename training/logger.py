"""Run logging: wandb for every run (offline when no API key is set), a console progress bar, and
`<run_dir>/metrics.jsonl` (one line per logged step) that tests and reports read."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from training.config import TrainConfig, to_dict


class RunLogger:
    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.rank, self.cfg = rank, cfg
        self.run_dir = Path(cfg.run_dir)
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (self.run_dir / "metrics.jsonl").open("a")
        self.bar = tqdm(
            total=cfg.schedule.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )
        mode = cfg.logging.wandb
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.logging.run_name,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=mode,
                config=to_dict(cfg),
            )

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb.dir if self.wandb is not None else None

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def image(self, step: int, name: str, image: Image.Image) -> Path | None:
        if self.rank != 0:
            return None
        path = self.run_dir / "samples" / f"{name}_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path))}, step=step)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.rank == 0:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
