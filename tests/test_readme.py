"""README commands stay accurate: every `python -m`, `torchrun` and `ray job submit` command in README.md names a
real module, passes that module's own argument parser, and (for training) its config and overrides load.

Commands that need a cluster, GPUs or released weights cannot run here; `make demo` and the other tests run the
same entry points for real on small data (tests/cluster/test_demo.py, tests/data_pipeline/test_ray_job_submit.py,
...)."""

import re
import shlex
from pathlib import Path

from helpers.cli import check_arguments

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    inline = re.findall(r"`((?:python|torchrun) -m [^`]+)`", text)
    return commands + [shlex.split(c) for c in inline if "<" not in c and " --" in c]  # full inline commands


def entry_point(argv: list[str]) -> tuple[str, list[str]]:
    """(module, its arguments) of a python -m / torchrun / ray job submit command line."""
    if argv[0] == "ray":
        assert argv[1:3] == ["job", "submit"], argv
        return entry_point(argv[argv.index("--") + 1 :])
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        m = argv.index("-m")
        get_args_parser().parse_args([*argv[1:m], "--module", argv[m + 1], *argv[m + 2 :]])  # torchrun's own flags
        return argv[m + 1], argv[m + 2 :]
    assert argv[:2] == ["python", "-m"], f"unexpected README command {' '.join(argv)}"
    return argv[2], argv[3:]


def test_readme_starts_with_make_demo_then_make_test():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    assert [line.split()[:2] for line in first_block[:2]] == [["make", "demo"], ["make", "test"]]


def test_every_readme_command_parses(monkeypatch):
    commands = [c for c in readme_commands() if c[0] != "make"]
    assert len(commands) >= 15
    for argv in commands:
        module, args = entry_point(argv)
        ns = check_arguments(module, args, monkeypatch)
        if module == "training.train":
            from training.config import load_config

            cfg = load_config(ns.config, ns.overrides)
            assert Path(ns.config).is_file() and cfg.run_dir


def test_stage_table_names_one_existing_module_or_package_per_stage():
    text = README.read_text()
    table = text[text.index("| stage | module or package |") :].split("\n\n")[0].splitlines()[2:]
    assert len(table) >= 8
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        named = re.findall(r"`([^`]+)`", cells[1])
        assert len(named) == 1, f"stage {cells[0]!r} names {named}; one module or package per stage"
        assert (REPO / named[0]).exists(), f"stage {cells[0]!r} names {named[0]}, which does not exist"
