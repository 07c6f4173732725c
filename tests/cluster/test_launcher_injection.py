"""Hostile values in the cluster launchers' inputs never run as shell and never reshape a manifest: each one is either
refused with one line (exit 2, naming the flag and the fix) or rendered safely. The sbatch and Ray watch scripts are
run with bash against stand-in executables (they only record their argv) and must not create the marker file a hostile
value tries to `touch`; the Kubernetes and Ray cluster YAML keeps exactly its top-level keys, and an accepted value
reaches the job word for word."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from test_launchers import CONFIG, TOKENIZE, WATCH, with_flags

from cluster import k8s, ray_cluster, slurm

REPO = Path(__file__).resolve().parents[2]
HOSTILE = {  # {m}: the marker file's path
    "newline": "x\ntouch {m}",
    "carriage-return": "x\rtouch {m}",
    "command-substitution": "$(touch {m})",
    "backticks": "`touch {m}`",
    "single-quote": "x'; touch {m}; '",
    "double-quote": 'x"; touch {m}; "',
    "hash": "x #; touch {m}",
    "semicolon": ";touch {m}",
}
CONTROL = {"newline": "a newline", "carriage-return": "a carriage return"}
STAND_INS = ("srun", "scontrol", "sbatch", "torchrun", "ray", "python")
# records its argv (NUL-separated, one file per call); scontrol also names a host, as `scontrol show hostnames` does
STAND_IN = """#!/bin/bash
printf '%s\\0' "${0##*/}" "$@" > "$RECORDS/call.$$"
if [[ ${0##*/} == scontrol ]]; then echo node-1; fi
exit 0
"""
K8S_KEYS = {"apiVersion", "kind", "metadata", "spec"}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the launchers resolve configs and the env file from the repository root


def hostile_file(tmp: Path, value: str, source: str) -> str:
    """A copy of `source` at a path that holds `value` (a '/' in it nests folders)."""
    path = tmp / "files" / f"{value}{Path(source).suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((REPO / source).read_bytes())
    return str(path)


def config_with_run_dir(tmp: Path, value: str) -> str:
    """The training config with `run_dir` set to `value` in the file itself (not by an override)."""
    doc = yaml.safe_load((REPO / CONFIG).read_text())
    doc["run_dir"] = value
    path = tmp / "run_dir_config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def replaced(argv: list[str], old: str, new: str) -> list[str]:
    return [new if word == old else word for word in argv]


class Slot(NamedTuple):
    """Where a hostile value goes: build(value, tmp) -> (argv, the word that must reach the job or None)."""

    id: str
    module: object
    build: Callable
    accepts: bool | None = True  # a value without control characters: True accepted, False refused, None either


def flag(argv: list[str], name: str, needle: bool = True) -> Callable:
    """The value as `name`'s argument, put before the `--` of argv (and, with needle, the word the job must get)."""
    return lambda v, tmp: (with_flags(argv, name, v), v if needle else None)


def at(argv: list[str], old: str) -> Callable:
    """The value in place of the word `old` of argv (a launched program's argument, or a flag's value)."""
    return lambda v, tmp: (replaced(argv, old, v), v)


def config_at_path(argv: list[str]) -> Callable:
    """The training config, copied to a path that holds the value."""

    def build(v, tmp):
        path = hostile_file(tmp, v, CONFIG)
        return replaced(argv, CONFIG, path), path

    return build


def env_file_at_path(argv: list[str]) -> Callable:
    """The env file, copied to a path that holds the value (it is sourced, not passed on)."""
    return lambda v, tmp: (with_flags(argv, "--env-file", hostile_file(tmp, v, "cluster/nccl.env")), None)


def override(argv: list[str]) -> Callable:
    return lambda v, tmp: ([*argv, f"data.data_dir={v}"], f"data.data_dir={v}")


def run_dir_in_config(argv: list[str], needle: bool) -> Callable:
    return lambda v, tmp: (replaced(argv, CONFIG, config_with_run_dir(tmp, v)), v if needle else None)


SLURM_TRAIN = ["train", "--nodes", "2", "--config", CONFIG, "--"]
SLURM_TOKENIZE = ["tokenize", "--nodes", "2", "--", *TOKENIZE]
SLURM_WATCH = ["watch", "--nodes", "2", "--", *WATCH]
OUTPUT, RUN_DIR = "/data/tokens p16", "/ckpt/runs/b16 x"  # the tokenize output and the watched run of TOKENIZE, WATCH
SLURM_SLOTS = [
    Slot("train --job-name", slurm, flag(SLURM_TRAIN, "--job-name"), accepts=False),
    Slot("train --partition", slurm, flag(SLURM_TRAIN, "--partition"), accepts=False),
    Slot("train --time", slurm, flag(SLURM_TRAIN, "--time"), accepts=False),
    Slot("train --account", slurm, flag(SLURM_TRAIN, "--account"), accepts=False),
    Slot("train --out", slurm, flag(SLURM_TRAIN, "--out", needle=False)),
    Slot("train --config", slurm, config_at_path(SLURM_TRAIN)),
    Slot("train --env-file", slurm, env_file_at_path(SLURM_TRAIN)),
    # OmegaConf reads an override's value as YAML: it may refuse one (a backtick cannot start a YAML token)
    Slot("train override", slurm, override(SLURM_TRAIN), accepts=None),
    Slot("train run_dir in the config", slurm, run_dir_in_config(SLURM_TRAIN, needle=True)),
    Slot("tokenize --job-name", slurm, flag(SLURM_TOKENIZE, "--job-name"), accepts=False),
    Slot("tokenize --partition", slurm, flag(SLURM_TOKENIZE, "--partition"), accepts=False),
    Slot(
        "tokenize --dashboard-host",
        slurm,
        lambda v, tmp: (with_flags(SLURM_TOKENIZE, "--dashboard-host", v), f"--dashboard-host={v}"),
    ),
    Slot("tokenize --output", slurm, at(SLURM_TOKENIZE, OUTPUT)),
    Slot("watch --job-name", slurm, flag(SLURM_WATCH, "--job-name"), accepts=False),
    Slot("watch --account", slurm, flag(SLURM_WATCH, "--account"), accepts=False),
    Slot("watch --env-file", slurm, env_file_at_path(SLURM_WATCH)),
    Slot("watch --run-dir", slurm, at(SLURM_WATCH, RUN_DIR)),
]

IMAGE = "reg.io/bitdance:1"
K8S_TRAIN = ["train", "--image", IMAGE, "--nodes", "2", "--config", CONFIG, "--pvc", "d:/data", "--"]
K8S_TOKENIZE = ["tokenize", "--image", IMAGE, "--", *TOKENIZE]
K8S_WATCH = ["watch", "--image", IMAGE, "--pvc", "d:/data", "--", *WATCH]
K8S_SLOTS = [
    Slot("train --job-name", k8s, flag(K8S_TRAIN, "--job-name"), accepts=False),  # a DNS name
    Slot("train --image", k8s, at(K8S_TRAIN, IMAGE)),
    Slot("train --config", k8s, config_at_path(K8S_TRAIN)),
    Slot("train --env-file", k8s, env_file_at_path(K8S_TRAIN)),
    Slot("train override", k8s, override(K8S_TRAIN), accepts=None),
    Slot("train run_dir in the config", k8s, run_dir_in_config(K8S_TRAIN, needle=False)),  # the header names it
    Slot("tokenize --output", k8s, at(K8S_TOKENIZE, OUTPUT)),
    Slot("watch --image", k8s, at(K8S_WATCH, IMAGE)),
    Slot("watch --run-dir", k8s, at(K8S_WATCH, RUN_DIR)),
    Slot("watch --namespace", k8s, flag(K8S_WATCH, "--namespace")),
    Slot("watch --pvc", k8s, lambda v, tmp: (replaced(K8S_WATCH, "d:/data", f"{v}:/data"), v)),
    Slot("watch --out", k8s, flag(K8S_WATCH, "--out", needle=False)),
]

RAY_UP = ["--provider", "aws", "--"]
RAY_UP_GCP = ["--provider", "gcp", "--project-id", "p", "--image", "projects/p/global/images/i", "--"]
RAY_SLOTS = [
    Slot("--cluster-name", ray_cluster, flag(RAY_UP, "--cluster-name")),
    Slot("--region", ray_cluster, flag(RAY_UP, "--region")),
    Slot("--image", ray_cluster, flag(RAY_UP, "--image")),
    Slot("--ssh-private-key", ray_cluster, flag(RAY_UP, "--ssh-private-key")),
    Slot("--out", ray_cluster, flag(RAY_UP, "--out", needle=False)),
    Slot("gcp --project-id", ray_cluster, at(RAY_UP_GCP, "p")),
    # the tokenize command is only in the header's submit line
    Slot("tokenize --output", ray_cluster, lambda v, tmp: ([*RAY_UP, *replaced(TOKENIZE, OUTPUT, v)], None)),
]
RAY_WATCH = ["watch", "--", *WATCH]
RAY_WATCH_SLOTS = [
    Slot("watch --address", ray_cluster, flag(RAY_WATCH, "--address")),
    Slot("watch --job-name", ray_cluster, flag(RAY_WATCH, "--job-name", needle=False)),
    Slot("watch --out", ray_cluster, flag(RAY_WATCH, "--out", needle=False)),
    Slot("watch --run-dir", ray_cluster, at(RAY_WATCH, RUN_DIR)),
]


def cases(slots: list[Slot]):
    return [pytest.param(slot, kind, id=f"{slot.id}-{kind}") for slot in slots for kind in HOSTILE]


def launch(slot: Slot, kind: str, tmp: Path, capsys) -> tuple[str | None, str | None]:
    """Run the launcher's dry run with the hostile value in its slot: (its output, or None when it refused the value;
    the word that must reach the job). A refusal must be one line, exit code 2, no traceback."""
    argv, needle = slot.build(HOSTILE[kind].format(m=tmp / "marker"), tmp)
    try:
        code = slot.module.main(with_flags(argv, "--dry-run"))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if code == 0:
        return out, needle
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m {slot.module.__name__}") and " error: " in lines[0]
    if kind in CONTROL:
        assert f"{CONTROL[kind]}; give a single-line value" in lines[0], lines[0]
    else:
        assert slot.accepts is not True, f"refused: {lines[0]}"
    return None, needle


def may_be_accepted(slot: Slot, kind: str) -> None:
    """(after the rendering was found safe) control characters and values the slot cannot hold must be refused."""
    assert kind not in CONTROL, f"{CONTROL.get(kind)} was accepted"
    assert slot.accepts is not False, "a value that was to be refused was accepted"


def run_script(text: str, tmp: Path) -> list[list[str]]:
    """Run a rendered script with bash, every cluster tool a stand-in: the argv of each stand-in call, once the marker
    file was found absent and the script ran to its end."""
    bin_dir, records = tmp / "bin", tmp / "records"
    bin_dir.mkdir()
    records.mkdir()
    for name in STAND_INS:
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    script = tmp / "job.sh"
    script.write_text(text)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp),
        "RECORDS": str(records),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_NODELIST": "node-[1-2]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "7",
    }
    # SIGTERM ignored (bash cannot trap it then): the tokenize script's exit trap then cannot stop a background srun
    # stand-in before it has recorded its argv
    ignore_term = lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)  # noqa: E731
    r = subprocess.run(
        ["bash", str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=60, preexec_fn=ignore_term
    )
    assert not (tmp / "marker").exists(), "a hostile value ran as shell"
    assert r.returncode == 0, r.stderr
    return [call.read_bytes().decode().split("\0")[:-1] for call in sorted(records.iterdir())]


def sbatch_lines_hold_one_word(text: str) -> None:
    """sbatch splits `#SBATCH` lines at whitespace, strips quotes and backslashes and ends them at `#`."""
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            option = line.removeprefix("#SBATCH ")
            assert " " not in option and not set("'\"\\#") & set(option), line


@pytest.mark.parametrize("slot,kind", cases(SLURM_SLOTS))
def test_sbatch_scripts_never_run_a_hostile_value(slot, kind, tmp_path, capsys):
    text, needle = launch(slot, kind, tmp_path, capsys)
    if text is None:
        return
    calls = run_script(text, tmp_path)
    sbatch_lines_hold_one_word(text)
    may_be_accepted(slot, kind)
    assert any(call[0] == "srun" for call in calls), calls
    if needle is not None:
        assert any(needle in call for call in calls), f"{needle!r} not in {calls}"


@pytest.mark.parametrize("slot,kind", cases(RAY_WATCH_SLOTS))
def test_ray_watch_script_never_runs_a_hostile_value(slot, kind, tmp_path, capsys):
    text, needle = launch(slot, kind, tmp_path, capsys)
    if text is None:
        return
    (call,) = run_script(text, tmp_path)
    may_be_accepted(slot, kind)
    assert call[:3] == ["ray", "job", "submit"]
    if needle is not None:
        assert needle in call, f"{needle!r} not in {call}"


def k8s_expand(word: str) -> str:
    """How Kubernetes reads a container command word: `$$` is one `$`, `$(NAME)` an env reference (kept here)."""
    return re.sub(r"\$(\$|\(\w+\))", lambda m: "$" if m[1] == "$" else m[0], word)


def strings(node, key=None):
    """Every string of a manifest, as the job reads it: container commands as Kubernetes expands them, the RayJob
    entrypoint as the shell splits it."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v, key)
    elif isinstance(node, str):
        if key == "command":
            yield k8s_expand(node)
        elif key == "entrypoint":
            yield from shlex.split(node)
        else:
            yield node


def check_manifest(text: str, keys: set[str], needle: str | None) -> None:
    lines = text.splitlines()
    body = [n for n, line in enumerate(lines) if not line.startswith("#")]
    assert all(line.startswith("#") for line in lines[: body[0]] + lines[body[-1] + 1 :]), text
    doc = yaml.safe_load(text)
    assert set(doc) == keys
    if needle is not None:
        assert needle in set(strings(doc)), f"{needle!r} not in the manifest"


@pytest.mark.parametrize("slot,kind", cases(K8S_SLOTS))
def test_k8s_manifests_keep_their_shape(slot, kind, tmp_path, capsys):
    text, needle = launch(slot, kind, tmp_path, capsys)
    if text is not None:
        check_manifest(text, K8S_KEYS, needle)
        may_be_accepted(slot, kind)


@pytest.fixture(scope="module")
def ray_up_keys() -> set[str]:
    parser = ray_cluster.build_parser()
    args = parser.parse_args(["--provider", "aws"])
    args.rendered_by = "test"
    return set(yaml.safe_load(ray_cluster.render(args)[0]))


@pytest.mark.parametrize("slot,kind", cases(RAY_SLOTS))
def test_ray_cluster_yaml_keeps_its_shape(slot, kind, ray_up_keys, tmp_path, capsys):
    text, needle = launch(slot, kind, tmp_path, capsys)
    if text is not None:
        check_manifest(text, ray_up_keys, needle)
        may_be_accepted(slot, kind)


def test_k8s_commands_hold_a_dollar_word_for_word(capsys):
    """Kubernetes expands `$(NAME)` in container commands: a user's `$` is written `$$`, so it stays literal."""
    assert k8s.main(with_flags([*K8S_TRAIN, "data.data_dir=/data/$(PYTHONPATH)/$$x"], "--dry-run")) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    command = doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert "data.data_dir=/data/$$(PYTHONPATH)/$$$$x" in command
    assert "$(MASTER_ADDR):$(MASTER_PORT)" in command  # the operator's rendezvous address is expanded


CHARACTERS = {
    "\n": "a newline",
    "\r": "a carriage return",
    "\t": "a tab",
    "\0": "a NUL",
    "\x1b": "the control character '\\x1b'",
    "\x7f": "the control character '\\x7f'",
    "\x85": "the control character '\\x85'",  # NEL: a line break to YAML
    "\u2028": "the line separator '\\u2028'",  # a line break to YAML
}


@pytest.mark.parametrize("char", CHARACTERS, ids=[repr(c) for c in CHARACTERS])
@pytest.mark.parametrize(
    "module,argv,name",
    [
        (slurm, with_flags(SLURM_TRAIN, "--job-name", "a{c}b"), "--job-name"),
        (slurm, with_flags(SLURM_WATCH, "--setup", "source .venv/bin/activate{c}touch m"), "--setup"),
        (k8s, with_flags(K8S_TOKENIZE, "--namespace", "ml{c}"), "--namespace"),
        (ray_cluster, ["--provider", "aws", "--cluster-name", "c{c}provider: {{}}"], "--cluster-name"),
        (ray_cluster, ["watch", "--", "--run-dir", "r{c}", "--task", "shapes"], "watch_args"),
    ],
    ids=["slurm --job-name", "slurm --setup", "k8s --namespace", "ray --cluster-name", "ray watch args"],
)
def test_control_characters_are_refused_naming_the_flag(module, argv, name, char, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(with_flags([a.format(c=char) for a in argv], "--dry-run"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert f"error: argument {name}: " in line and f"holds {CHARACTERS[char]}; give a single-line value" in line, line


@pytest.mark.parametrize(
    "value,problem",
    [("gpu a100", "' '"), ("gpu#2", "'#'"), ('"gpu"', "'\"'"), ("gpu\\", "'\\\\'"), ("hetjob", "'hetjob'")],
)
def test_sbatch_values_hold_nothing_sbatch_reads_specially(value, problem, capsys):
    with pytest.raises(SystemExit):
        slurm.main(with_flags(SLURM_TRAIN, "--partition", value, "--dry-run"))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m cluster.slurm train: error: argument --partition: ") and problem in line, line
