"""Every training, checkpoint, eval and cluster command of README.md runs, as a tiny stand-in: the same module, flags
and config file, in a workspace of tiny fixtures where the README's paths point (tests/helpers/readme_workspace.py),
with overrides that shrink the model, the data and the run (`stand_in` makes every change, from the tables below).

A README command with no stand-in fails `test_every_readme_command_has_a_stand_in_or_a_reason`; the commands that
cannot run here are in UNAVAILABLE with their reason (and the one line they must fail with instead). A command that
reads what another writes runs after it (import -> train from it; import -> reshard -> export; generate -> score ->
report), whichever commands are selected. torchrun commands and the Ray tokenize job run as processes; the other
`python -m` commands run in this process through their `main(argv)` (the plain tokenize commands without Ray)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.readme_workspace import DATA_VOCAB_ROWS, build_workspace
from test_readme import readme_commands

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MEGATRON_TRAIN = REPO / "tests" / "helpers" / "megatron_train_cpu.py"  # training.train under the CPU harness

# README commands that cannot run here: (reason, a regex of the one line they must fail with instead, or None: not run)
UNAVAILABLE = {
    "make demo": ("installs, then runs every stage for minutes; tests/cluster/test_demo.py runs a short demo", None),
    "make test": ("the test suite itself", None),
    "eval.scorers geneval": (
        "needs the official GenEval repository and its detector weights (/opt/geneval, /models/mask2former)",
        r"error: GenEval scorer incomplete: opt/geneval/\S+ not found; .*",
    ),
    "cluster.gpu_check": ("needs a CUDA GPU", r"error: cluster.gpu_check needs a CUDA GPU .*"),
}
PLACEHOLDER_ROOTS = ("/data/", "/models/", "/ckpt/", "/opt/")  # absolute README paths: /x/y -> <workspace>/x/y
OUTPUT_FLAGS = ("--output", "--dst", "--out")
# torchrun's launch size and rendezvous: replaced by --standalone --nproc-per-node N
TORCHRUN_LAUNCH = {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--standalone"}
MAX_PROCESSES = 2  # per launch, where the README's layout needs no more (2 CPU cores)
TRAIN_SHRINK = [  # every training command: two steps of two rows (or images), no periodic evaluation, no wandb
    "schedule.total_steps=2",
    "schedule.warmup_steps=1",
    "data.global_batch=2",
    "data.micro_batch=1",
    "data.num_workers=0",
    "eval.every=0",
    "logging.wandb=disabled",
]
T2I_SHRINK = [
    "model.attention=dense",  # FlexAttention has no backward on CPU
    "data.token_budget=640",  # rows of the tiny 32x64 px images, not 37,376 positions
]
GENERATE_SHRINK = {"--limit": "2", "--steps": "2"}  # two prompts (or images) of two head steps each
T2I_GENERATE_SHRINK = {"--image-size": "32x32", "--height": "32", "--width": "32"}  # a size of the tiny models


# ---- rewriting a README command into its stand-in -------------------------------------------------------------------


def entry(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(module, its arguments, torchrun's flags, [] when not launched by torchrun) of a README command."""
    if argv[0] == "ray":
        # `ray job submit`: tests/data_pipeline/test_ray_job_submit.py submits jobs
        return entry(argv[argv.index("--") + 1 :])
    if argv[0] == "torchrun":
        m = argv.index("-m")
        return argv[m + 1], argv[m + 2 :], argv[1:m]
    assert argv[:2] == ["python", "-m"], f"no stand-in for {shlex.join(argv)}: not a python -m / torchrun command"
    return argv[2], argv[3:], []


def unavailable(argv: list[str]) -> tuple[str, str | None] | None:
    if argv[0] == "make":
        key = " ".join(argv[:2])
        assert key in UNAVAILABLE, f"no stand-in for {shlex.join(argv)}"
        return UNAVAILABLE[key]
    module, args, _ = entry(argv)
    if module == "cluster.gpu_check" and gpu_available():
        return ("runs for real on a GPU machine (minutes); not part of the CPU suite", None)
    for key in (f"{module} {args[0]}" if args else module, module):
        if key in UNAVAILABLE:
            return UNAVAILABLE[key]
    return None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def workspace_path(value: str) -> str:
    """A README path as the stand-in names it: /data/x -> data/x (in the workspace, where the commands run), the
    repository's own training/configs -> their absolute path; anything else unchanged."""
    if value.startswith(PLACEHOLDER_ROOTS):
        return value[1:]
    if value.startswith("training/configs"):
        return str(REPO / value)
    return value


def rewrite_word(word: str) -> str:
    """workspace_path of a word, of a `--flag=value`'s value or of a training override `key=value`'s value."""
    if "=" in word and (word.startswith("--") or not word.startswith("-")):
        key, value = word.split("=", 1)
        return f"{key}={workspace_path(value)}"
    return workspace_path(word)


def flag_value(args: list[str], flag: str) -> str | None:
    for i, word in enumerate(args):
        if word == flag:
            return args[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """args with `flag` set to `value`: its value replaced where given, else appended."""
    out, found, words = [], False, iter(args)
    for word in words:
        if word == flag or word.startswith(flag + "="):
            out += [flag, value]
            found = True
            if word == flag:
                next(words)
        else:
            out.append(word)
    return out if found else [*out, flag, value]


def tiny_name(name: str) -> str:
    """14B-16x, B-16x -> tiny-16x: the tiny config of the same P."""
    return re.sub(r"^[^-]+-", "tiny-", name)


def training_config(args: list[str]):
    """The TrainConfig of `--config <yaml> [overrides]`, not validated: the run validates it (and checks its layout
    against the megatron checkpoint of `model.init_from` once that exists)."""
    from omegaconf import OmegaConf

    from training.config import TrainConfig

    i = args.index("--config")
    parts = [OmegaConf.structured(TrainConfig), OmegaConf.load(args[i + 1]), OmegaConf.from_dotlist(args[i + 2 :])]
    return OmegaConf.to_object(OmegaConf.merge(*parts))


@dataclass
class StandIn:
    readme: str  # the README command
    module: str
    args: list[str]  # the module's arguments, rewritten
    torchrun: bool  # launched by torchrun; else `python -m`, run in this process unless `subprocess`
    nproc: int = 1
    harness: bool = False  # megatron training: tests/helpers/megatron_train_cpu.py instead of -m training.train
    subprocess: bool = False
    dry_run: bool = False  # a cluster launcher's --dry-run: run as written, from the repository root
    outputs: list[str] = field(default_factory=list)  # what it writes (workspace-relative)
    inputs: list[str] = field(default_factory=list)  # its other path-like words

    @property
    def in_process(self) -> bool:
        return not (self.torchrun or self.subprocess)

    def argv(self) -> list[str]:
        if not self.torchrun:
            return [sys.executable, "-m", self.module, *self.args]
        program = [str(MEGATRON_TRAIN)] if self.harness else ["-m", self.module]
        return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(self.nproc), *program, *self.args]


def stand_in(readme: str) -> StandIn:
    argv = shlex.split(readme)
    module, args, launch = entry(argv)
    s = StandIn(readme, module, args, torchrun=bool(launch), dry_run="--dry-run" in args)
    if s.dry_run:
        return s
    launch = [w.replace("_", "-") if w.startswith("--") else w for w in launch]
    unknown = [w for w in launch if w.startswith("-") and w not in TORCHRUN_LAUNCH]
    assert not unknown, f"no stand-in for torchrun's {unknown} in {readme}"
    s.nproc = min(int(flag_value(launch, "--nproc-per-node") or 1), MAX_PROCESSES)
    a = [rewrite_word(w) for w in args]

    if module == "data_pipeline.tokenize":
        s.subprocess = argv[0] == "ray"  # the Ray job (without Ray Jobs) starts its own local Ray
        if flag_value(a, "--mode") != "imagenet" and flag_value(a, "--size") is None:
            a += ["--size", "32x32", "--size", "32x64"]  # buckets of the tiny images (the default: 256..1024 px)
        if flag_value(a, "--image-size") is not None:
            a = set_flag(a, "--image-size", "32")
    elif module == "training.train":
        readme_cfg = training_config(a)
        run = f"{Path(flag_value(a, '--config')).stem}_{hashlib.sha1(readme.encode()).hexdigest()[:6]}"
        a += [*TRAIN_SHRINK, f"run_dir=runs/{run}"]  # each README run of a config gets its own folder
        if readme_cfg.model.kind in ("t2i", "c2i"):
            a.append(f"model.name={tiny_name(readme_cfg.model.name)}")
        if readme_cfg.model.kind == "t2i":
            a += T2I_SHRINK
        cfg = training_config(a)
        if cfg.engine.kind == "megatron":  # the README's tp x pp layout, data-parallel size 1, under the CPU harness
            s.harness, s.nproc = True, cfg.parallel.tp * cfg.parallel.pp
        s.outputs.append(cfg.run_dir)
    elif module == "training.checkpoint":
        if flag_value(a, "--adapter") is not None:  # the adapter a README fine-tuning run exports
            a = set_flag(a, "--adapter", run_output(flag_value(a, "--adapter")))
        if flag_value(a, "--model") is not None:
            a = set_flag(a, "--model", tiny_name(flag_value(a, "--model")))
        if flag_value(a, "--vocab-size") is not None:  # rows for the tiny data's vocabulary
            a = set_flag(a, "--vocab-size", str(DATA_VOCAB_ROWS))
    elif module == "eval.generate":
        s.nproc = 1  # the images do not depend on the number of ranks (tests/eval/test_eval_generate.py)
        shrink = dict(GENERATE_SHRINK)
        if flag_value(a, "--lora") is not None:
            a = set_flag(a, "--lora", run_output(flag_value(a, "--lora")))
        if flag_value(a, "--task") == "imagenet":
            shrink["--per-class"] = "1"
            if flag_value(a, "--classes") is not None:  # ImageNet class ids -> ids of the tiny models' classes
                from models.c2i.model import get_c2i_config

                n = get_c2i_config("tiny").num_classes
                shrink["--classes"] = ",".join(str(int(c) % n) for c in flag_value(a, "--classes").split(","))
        else:
            shrink |= T2I_GENERATE_SHRINK
        if flag_value(a, "--task") == "shapes":
            shrink["--per-tag"] = "1"
        for flag, value in shrink.items():
            a = set_flag(a, flag, value)
    elif module == "eval.shapes_bench":
        a = set_flag(a, "--chance-samples", "20")
    elif module == "eval.watch":  # the checkpoints there now of the README run it watches, two tiny prompts each
        s.nproc = 1
        a = set_flag(a, "--run-dir", watched_run(flag_value(a, "--run-dir")))
        for flag, value in (GENERATE_SHRINK | T2I_GENERATE_SHRINK | {"--per-tag": "1"}).items():
            a = set_flag(a, flag, value)
        a.append("--once")

    s.args = a
    s.outputs = [os.path.normpath(p) for p in s.outputs + [flag_value(a, f) for f in OUTPUT_FLAGS] if p is not None]
    values = [w.split("=", 1)[1] if "=" in w else w for w in a]
    paths = {os.path.normpath(v) for v in values if "/" in v and not v.startswith(("-", "/"))}
    s.inputs = sorted(paths - set(s.outputs))
    return s


def run_output(path: str) -> str:
    """A path inside a README training run's folder (`<run_dir>/export/adapter`) inside its stand-in's folder."""
    parts = Path(path).parts
    for n in range(len(parts), 0, -1):
        with contextlib.suppress(AssertionError):
            return str(Path(watched_run(str(Path(*parts[:n])))).joinpath(*parts[n:]))
    raise AssertionError(f"no README training command writes {path}")


def watched_run(run_dir: str) -> str:
    """The stand-in run folder of the README training command that writes `run_dir` (workspace-relative)."""
    for readme in COMMANDS:
        if readme.startswith("make "):
            continue
        module, args, _ = entry(shlex.split(readme))
        if module == "training.train" and f"run_dir={run_dir}" in [rewrite_word(w) for w in args]:
            return training_config(stand_in(readme).args).run_dir
    raise AssertionError(f"no README training command writes {run_dir}")


# ---- running stand-ins -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float


def tokenize_without_ray(args: list[str]) -> None:
    from data_pipeline.tokenize import parse_args, run_tokenize

    run_tokenize(parse_args(args), local=True)


IN_PROCESS = {"data_pipeline.tokenize": tokenize_without_ray}  # else the module's (or its __main__'s) main(argv)


def call_main(module: str, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m module args`, run through its main(argv) in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if module in IN_PROCESS:
                ret = IN_PROCESS[module](args)
            else:
                mod = importlib.import_module(module)
                if not hasattr(mod, "main"):
                    mod = importlib.import_module(f"{module}.__main__")
                ret = mod.main(args)
            rc = ret if isinstance(ret, int) else 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)  # as the interpreter prints SystemExit("...")
    return rc, out.getvalue(), err.getvalue()


def run_process(argv: list[str], cwd: Path, timeout: float = 900) -> tuple[int, str, str]:
    """Run argv in a session of its own; past the timeout that session (torchrun's workers, the job's Ray) is killed,
    and nothing else."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",  # (torchrun sets it only for more than one process) no thread contention on 2 cores
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout} s)"
    return proc.returncode, out, err


class Runner:
    """Runs each stand-in once, in the shared workspace, after the stand-ins that write its inputs."""

    def __init__(self, ws: Path):
        self.ws = ws
        self.results: dict[str, Result] = {}
        self.producers: dict[str, str] = {}  # output path -> the command writing it (README commands first)
        for readme in COMMANDS:
            if unavailable(shlex.split(readme)) is None:
                for path in stand_in(readme).outputs:
                    self.producers.setdefault(path, readme)

    def producers_of(self, s: StandIn) -> list[str]:
        found = []
        for path in s.inputs:
            for out, producer in self.producers.items():
                if (path == out or path.startswith(out + "/")) and producer not in (s.readme, *found):
                    found.append(producer)
        return found

    def run(self, readme: str) -> Result:
        """The result of `readme`'s stand-in, run once, after what writes its inputs."""
        if readme not in self.results:
            s = stand_in(readme)
            self.run_producers(s)
            self.results[readme] = self.execute(s)
        return self.results[readme]

    def run_producers(self, s: StandIn) -> None:
        for producer in self.producers_of(s):
            done = self.run(producer)
            assert done.rc == 0, f"`{s.readme}` reads what `{producer}` writes, which failed:\n{done.err[-3000:]}"

    def execute(self, s: StandIn) -> Result:
        start = time.perf_counter()
        if s.in_process:
            with contextlib.chdir(REPO if s.dry_run else self.ws):
                rc, out, err = call_main(s.module, s.args)
        else:
            rc, out, err = run_process(s.argv(), self.ws)
        result = Result(rc, out, err, time.perf_counter() - start)
        how = "in-process" if s.in_process else "subprocess"
        print(f"{result.seconds:6.1f} s  {how}: {shlex.join(s.argv())}\n          README: {s.readme}")
        return result


# ---- what each command must produce ---------------------------------------------------------------------------------


def check_output(s: StandIn, result: Result, ws: Path) -> None:
    what = f"`{s.readme}` (stand-in: {shlex.join(s.argv())})"
    m, a = s.module, s.args
    if s.dry_run:
        assert result.out.rstrip().splitlines()[-1].startswith("# then: "), f"{what} printed no submit line"
    elif m == "data_pipeline.tokenize":
        manifest = json.loads((ws / flag_value(a, "--output") / "manifest.json").read_text())
        assert manifest["samples"] > 0 and not manifest["skipped"], f"{what}: {manifest}"
    elif m == "training.train":
        run = ws / training_config(a).run_dir
        latest = (run / "checkpoints" / "latest").read_text().strip()
        assert latest == "step_00000002" and (run / "checkpoints" / latest / "trainer.json").is_file(), what
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 2, f"{what}: logged steps {steps}"
    elif m == "training.checkpoint" and a[0] in ("import", "reshard"):
        layout = json.loads((ws / flag_value(a, "--dst") / "trainer.json").read_text())["megatron"]["layout"]
        assert (layout["tp"], layout["pp"]) == (int(flag_value(a, "--tp")), int(flag_value(a, "--pp"))), what
    elif m == "training.checkpoint" and a[0] in ("export", "merge"):
        from models.t2i.io import load_t2i_folder

        load_t2i_folder(ws / flag_value(a, "--dst"))
    elif m == "eval.generate":
        out, task = ws / flag_value(a, "--out"), flag_value(a, "--task")
        pattern = {"imagenet": "samples.npz", "dpg": "*.png"}.get(task, "0000[01]/samples/0000.png")
        assert list(out.glob(pattern)), f"{what} wrote no {pattern}: {sorted(p.name for p in out.rglob('*'))}"
    elif m == "eval.shapes_bench":
        assert "shapes" in json.loads((ws / a[0] / "summary.json").read_text()), what
    elif m == "eval.watch":
        rows = [
            json.loads(line) for line in (ws / flag_value(a, "--run-dir") / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows if "watch/score" in r] == [2], f"{what}: no scored checkpoint"
    elif m == "eval.report":
        assert (ws / a[0] / "report.md").read_text().startswith("# Evaluation report"), what
    elif m == "cluster.plan" and flag_value(a, "--finetune") is not None:
        assert f"\n{flag_value(a, '--finetune')} " in result.out, f"{what} printed no plan:\n{result.out[-2000:]}"
    elif m == "cluster.plan":
        assert "torchrun" in result.out, f"{what} printed no command:\n{result.out[-2000:]}"
    elif m == "cluster.preflight":
        assert "preflight passed on 1 node(s), 2 rank(s)" in result.out, f"{what}:\n{result.out[-2000:]}"
    else:
        raise AssertionError(f"no output check for {what}")


def command_id(readme: str) -> str:
    argv = shlex.split(readme)
    if argv[0] == "make":
        return " ".join(argv[:2])
    module, args, _ = entry(argv)
    config = flag_value(args, "--config")
    first = args[0] if args and not args[0].startswith("-") else ""
    detail = flag_value(args, "--task") or flag_value(args, "--source") or (config and Path(config).stem) or ""
    return " ".join(w for w in (module, first, detail) if w)


COMMANDS = [shlex.join(c) for c in readme_commands()]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    ws = tmp_path_factory.mktemp("readme") / "ws"
    build_workspace(ws)
    return Runner(ws)


@pytest.mark.slow
@pytest.mark.parametrize("readme", COMMANDS, ids=[f"{i:02d} {command_id(c)}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs_as_a_tiny_stand_in(readme, runner):
    missing = unavailable(shlex.split(readme))
    if missing is not None and missing[1] is None:
        pytest.skip(f"not run here: {missing[0]}")
    result = runner.run(readme)
    s = stand_in(readme)
    tail = f"\nstdout:\n{result.out[-2000:]}\nstderr:\n{result.err[-4000:]}"
    if missing is not None:  # run only to fail with its one line
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert result.rc != 0 and len(lines) == 1, f"`{readme}` should fail in one line ({missing[0]}):{tail}"
        assert re.fullmatch(missing[1], lines[0]), f"`{readme}` failed otherwise than expected:{tail}"
        return
    assert result.rc == 0, f"`{readme}` failed as `{shlex.join(s.argv())}` (exit {result.rc}):{tail}"
    check_output(s, result, runner.ws)


# ---- the README's own cluster launches -------------------------------------------------------------------------------


def readme_launch(readme: str) -> tuple[str, list[str], int] | None:
    """(config, overrides, world size) of a README command that launches training on a cluster, else None."""
    if readme.startswith("make "):
        return None
    module, args, launch = entry(shlex.split(readme))
    if module == "training.train":
        launch = [w.replace("_", "-") for w in launch]
        nodes = int((flag_value(launch, "--nnodes") or "1").split(":")[-1])
        i = args.index("--config")
        return args[i + 1], args[i + 2 :], nodes * int(flag_value(launch, "--nproc-per-node") or 1)
    if module in ("cluster.slurm", "cluster.k8s") and args[0] == "train":
        overrides = args[args.index("--") + 1 :] if "--" in args else []
        world = int(flag_value(args, "--nodes")) * int(flag_value(args, "--gpus-per-node"))
        return flag_value(args, "--config"), overrides, world
    return None


LAUNCHES = [(c, readme_launch(c)) for c in COMMANDS if readme_launch(c) is not None]


@pytest.mark.parametrize(
    "readme,launch",
    [pytest.param(c, launch, id=f"{command_id(c)} on {launch[2]} ranks") for c, launch in LAUNCHES],
)
def test_readme_training_command_accepts_its_own_launch(readme, launch):
    """The stand-ins shrink the batch; the README's own config and overrides must still divide over the ranks the
    command launches (its nodes x processes), as the run checks at its start."""
    from training.config import grad_accumulation, load_config

    config, overrides, world = launch
    cfg = load_config(REPO / config, overrides)
    try:
        grad_accumulation(cfg, world)
    except ValueError as e:
        raise AssertionError(f"`{readme}` fails as written on its {world} ranks: {e}") from None


def test_every_readme_command_has_a_stand_in_or_a_reason():
    assert len(COMMANDS) >= 25
    for readme in COMMANDS:
        if unavailable(shlex.split(readme)) is None:
            stand_in(readme)  # "no stand-in for ..." for a launcher or torchrun flag it cannot map
