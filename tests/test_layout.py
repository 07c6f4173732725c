"""The layering rules of the repository: models import no training, data or eval code; the code that must exist
once (the two T2I implementations' shared math, the next-patch sampling loop, the training loop) is not copied."""

import ast
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODELS = ("training", "data_pipeline", "eval", "cluster")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_models_import_no_training_data_eval_or_cluster_code():
    bad = {
        f"{p.relative_to(REPO)} imports {m}"
        for p in (REPO / "models").rglob("*.py")
        for m in imported_modules(p)
        if m.split(".")[0] in FORBIDDEN_IN_MODELS
    }
    assert not bad, sorted(bad)


def code_lines(path: Path) -> list[str]:
    """Lines that carry code: stripped, without blanks, comments, docstring-only lines and imports."""
    out = []
    for line in path.read_text().splitlines():
        s = " ".join(line.split())
        if not s or s.startswith(("#", "import ", "from ", '"""')) or s in ("(", ")", "[", "]", "{", "}", "),"):
            continue
        out.append(s)
    return out


def shared_runs(a: list[str], b: list[str], n: int = 6) -> list[tuple[str, ...]]:
    windows = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
    return [tuple(b[i : i + n]) for i in range(len(b) - n + 1) if tuple(b[i : i + n]) in windows]


@pytest.mark.parametrize(
    "a,b",
    [
        ("models/t2i/model.py", "models/t2i/megatron/model.py"),
        ("models/c2i/sampler.py", "models/t2i/sampler.py"),
        ("training/train.py", "cluster/gpu_check.py"),
        ("training/engines/megatron.py", "cluster/gpu_check.py"),
        ("training/tasks/t2i.py", "training/engines/megatron_checkpoint.py"),
        ("cluster/slurm.py", "cluster/k8s.py"),
        ("cluster/slurm.py", "cluster/ray_cluster.py"),
        ("cluster/k8s.py", "cluster/ray_cluster.py"),
    ],
)
def test_no_six_line_block_is_copied_between(a, b):
    runs = shared_runs(code_lines(REPO / a), code_lines(REPO / b))
    assert not runs, f"{a} and {b} share {len(runs)} runs of 6 lines, e.g. {runs[0]}"


def test_there_is_one_training_entry_point():
    loops = sorted(
        f"{p.relative_to(REPO)}:{node.name}"
        for p in (REPO / "training").rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef)
        and (node.name == "train" or node.name.startswith("train_"))
        and node.name != "train_step"
    )
    assert loops == ["training/train.py:train"], loops


def test_every_engine_implements_the_engine_protocol():
    pytest.importorskip("megatron.core")
    from training.engines import Engine
    from training.engines.deepspeed import DeepSpeedEngine
    from training.engines.megatron import MegatronEngine

    wanted = {n for n in vars(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    for engine in (DeepSpeedEngine, MegatronEngine):
        source = inspect.getsource(engine)
        assigned = set(re.findall(r"self\.(\w+)\s*[,=]", source))  # `self.x = ...`, `self.x, self.y = ...`
        missing = {n for n in wanted if not hasattr(engine, n) and n not in assigned}
        assert not missing, f"{engine.__name__} lacks {sorted(missing)} of training.engines.Engine"
