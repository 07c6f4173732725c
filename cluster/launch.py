"""What the cluster launchers (`cluster.slurm`, `cluster.k8s`, `cluster.ray_cluster`) share: one-line argument errors,
shell rendering of command lines, the command lines they all launch (torchrun of `training.train`, `eval.watch` or
`cluster.preflight`, `python -m data_pipeline.tokenize`, `ray job submit`), each checked by its entry point's own
parser or config loader before anything is written, and `--dry-run` (print the file and the command) or write and
submit.

Nothing a user gives can change the shape of a rendered file: every string argument, and every config value a file
shows, is refused when it holds a control or line-break character (`one_line`); shell words go through shlex.quote,
YAML through the YAML library, and comment lines through `comment`, which keeps each one a single `#` line."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENV_FILE = "cluster/nccl.env"
RAY_GCS_PORT = 6379
RAY_DASHBOARD_PORT = 8265


class LaunchError(ValueError):
    """A launcher input that cannot work; its message is one line naming the problem and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: message`), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------- values that stay on their line

CHARACTER_NAMES = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\0": "a NUL"}


def unsafe_character(text: str) -> str | None:
    """The first character of `text` that could end or corrupt a line of a script or manifest, named: a control
    character (newline, CR, NUL, tab, ESC, DEL; C1 such as NEL) or a Unicode line or paragraph separator (NEL and
    these end a line for YAML); None when there is none."""
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc":
            return CHARACTER_NAMES.get(ch, f"the control character {ch!r}")
        if category in ("Zl", "Zp"):
            return f"the {'line' if category == 'Zl' else 'paragraph'} separator {ch!r}"
    return None


def one_line(text: str) -> str:
    """The argparse type of every launcher string argument: `text`, refused when it would not stay on one line."""
    if problem := unsafe_character(text):
        raise argparse.ArgumentTypeError(f"{text!r} holds {problem}; give a single-line value")
    return text


def escaped(text: str) -> str:
    """`text` with each character `unsafe_character` names written as its escape (`\\n`, `\\x85`): one line."""
    return "".join(ch.encode("unicode_escape").decode() if unsafe_character(ch) else ch for ch in text)


def comment(text: str) -> str:
    """`text` as one comment line of a script or YAML file (`# text`): a line break it holds is escaped."""
    return f"# {escaped(text)}"


class LauncherParser(OneLineParser):
    """The launchers' parser: one-line errors, and every string argument one line (`one_line` is the type of each
    argument that stores strings and names no type of its own)."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action", "store") in ("store", "append", "extend") and "type" not in kwargs:
            kwargs["type"] = one_line
        return super().add_argument(*args, **kwargs)


def _bounded_int(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


positive_int = _bounded_int(1)
non_negative_int = _bounded_int(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


# ---------------------------------------------------------------- shell rendering


class Shell(str):
    """A word the shell expands when the script runs (e.g. `$HEAD:29500`): rendered in double quotes."""


def quote(word) -> str:
    if isinstance(word, Shell):
        return f'"{word}"'
    return shlex.quote(f"{word:g}" if isinstance(word, float) else str(word))


def shell_line(argv, width: int = 110, indent: str = "    ") -> str:
    """`argv` as one shell command, continued over lines of about `width` characters with trailing backslashes."""
    words, groups = [quote(w) for w in argv], []
    for word in words:  # an option stays on the line of its value
        if groups and groups[-1].startswith("-") and " " not in groups[-1] and not word.startswith("-"):
            groups[-1] += " " + word
        else:
            groups.append(word)
    lines, current = [], ""
    for group in groups:
        if current and len(current) + 1 + len(group) > width:
            lines.append(current + " \\")
            current = indent + group
        else:
            current = f"{current} {group}" if current else group
    return "\n".join([*lines, current])


def joined_lines(text: str) -> list[str]:
    """The lines of a shell script with backslash continuations joined (how the shell reads them)."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


# ---------------------------------------------------------------- the command lines the launchers run


def torchrun(nnodes, nproc_per_node, endpoint, rdzv_id, max_restarts: int, module: str, args: list) -> list:
    """One torchrun per node with a c10d rendezvous (flag spellings as torch.distributed.run's parser has them)."""
    return [
        "torchrun",
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        nproc_per_node,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id,
        "--max-restarts",
        max_restarts,
        "-m",
        module,
        *args,
    ]


def training_args(config: str, overrides: list[str], max_restarts: int):
    """(`training.train` arguments, the loaded TrainConfig): the config file and overrides must load here first, and
    restarts must resume (checkpoint.resume auto or a checkpoint, not none)."""
    from training.config import load_config

    if not Path(config).is_file():
        raise LaunchError(f"config file {config} does not exist; pass --config training/configs/<name>.yaml")
    try:
        cfg = load_config(config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise LaunchError(f"{config} with overrides {overrides}: {e}") from None
    except yaml.YAMLError as e:  # OmegaConf reads each override's value as YAML
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LaunchError(f"an override of {overrides} does not parse as YAML ({problem}); quote its value") from None
    # the config values the rendered files show (comments, preflight's paths): overrides were checked by argparse
    shown = {"run_dir": cfg.run_dir, "data.data_dir": cfg.data.data_dir, "model.init_from": cfg.model.init_from}
    shown["checkpoint.resume"] = cfg.checkpoint.resume
    for key, value in shown.items():
        if isinstance(value, str) and (problem := unsafe_character(value)):
            raise LaunchError(f"{key} {value!r} in {config} holds {problem}; give a single-line value")
    if cfg.checkpoint.resume == "none" and max_restarts:
        raise LaunchError(
            f"checkpoint.resume=none with --max-restarts {max_restarts} would restart from step 0; "
            "drop the override or pass --max-restarts 0"
        )
    return ["--config", config, *overrides], cfg


def checked_by(parse, args: list[str], what: str):
    """parse(args) with its argparse errors turned into one LaunchError line (naming `what` was rejected)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(args)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        reason = lines[-1].split("error: ", 1)[-1] if lines else "rejected"
        raise LaunchError(f"{what} arguments rejected: {reason}") from None


def tokenize_command(args: list[str]) -> list[str]:
    """`python -m data_pipeline.tokenize <args>`, checked by the tokenize module's own parser."""
    from data_pipeline import tokenize

    if not args:
        raise LaunchError("no tokenize arguments; pass them after `--`, e.g. -- --source wds --input /data/tars ...")
    checked_by(tokenize.parse_args, args, "data_pipeline.tokenize")
    return ["python", "-m", "data_pipeline.tokenize", *args]


def watch_args(args: list[str]) -> list[str]:
    """`eval.watch` arguments, checked by its own parser on the flags alone (the run folder and the scorer are checked
    where the job runs)."""
    from eval.watch.cli import parse_flags

    if not args:
        raise LaunchError("no eval.watch arguments; pass them after `--`, e.g. -- --run-dir /ckpt/run --task shapes")
    checked_by(parse_flags, args, "eval.watch")
    return list(args)


def ray_job_submit(address, entrypoint: list, options: tuple = ()) -> list:
    """`ray job submit [options]` of `entrypoint` from the repository root (its code travels as the job's working
    dir)."""
    return ["ray", "job", "submit", "--address", address, "--working-dir", ".", *options, "--", *entrypoint]


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped), as the scripts' `source` sees them."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"env file {path} does not exist; pass --env-file {DEFAULT_ENV_FILE} or your own")
    env = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise LaunchError(f"{path}:{n} is not a KEY=VALUE line: {raw!r}")
        env[key] = value.strip().strip("'\"")
    return env


def dns_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        raise LaunchError(f"--job-name {name!r} must be lower-case letters, digits and '-', at most 63 characters")
    return name


class _SafeDumperWithoutAliases(yaml.SafeDumper):
    """PyYAML's safe dumper, writing a shared sub-tree out in full each time (no &anchors / *aliases)."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_SafeDumperWithoutAliases, sort_keys=False, default_flow_style=False, width=1 << 16)


def yaml_file(header: list[str], doc: dict) -> str:
    """A YAML file: the header lines as comments, then `doc` written by the YAML library."""
    return "".join(comment(line) + "\n" for line in header) + to_yaml(doc)


# ---------------------------------------------------------------- common flags and delivery


def add_delivery_flags(
    parser: argparse.ArgumentParser, job_name: str, suffix: str, name_flag="--job-name", name_type=one_line
) -> None:
    parser.add_argument(
        name_flag, dest="job_name", default=job_name, type=name_type, help=f"the name (default {job_name})"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the file and the command; write and run nothing")
    parser.add_argument("--out", help=f"where the rendered file is written (default runs/launch/<job-name>{suffix})")
    parser.set_defaults(suffix=suffix)


def out_path(args: argparse.Namespace) -> str:
    return args.out or f"runs/launch/{args.job_name}{args.suffix}"


def deliver(text: str, out: str, submit: list[str], dry_run: bool) -> int:
    """--dry-run: print the file, then the command that would run as a trailing comment (so the output stays a valid
    script or YAML); otherwise write the file and run the command (its exit code is returned)."""
    if dry_run:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        print(comment(f"then: {shlex.join(submit)}"))
        return 0
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if shutil.which(submit[0]) is None:
        raise LaunchError(f"wrote {out}, but {submit[0]} is not on PATH; run `{shlex.join(submit)}` where it is")
    print(f"wrote {out}; running {shlex.join(submit)}", flush=True)
    return subprocess.run(submit).returncode


def run_main(parser: argparse.ArgumentParser, argv, render) -> int:
    """Parse argv, render(args) -> (file text, submit command) and deliver to out_path(args) (None: nothing to
    deliver); a LaunchError is one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.rendered_by = shlex.join([*parser.prog.split(), *argv])  # for the rendered file's header `comment`
    try:
        rendered = render(args)
        if rendered is None:  # a helper subcommand that did its work
            return 0
        text, submit = rendered
        return deliver(text, out_path(args), submit, args.dry_run)
    except LaunchError as e:
        parser.error(escaped(str(e)))
