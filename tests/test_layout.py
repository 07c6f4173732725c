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
        ("training/train.py", "cluster/gpu_check/megatron.py"),
        ("training/engines/megatron.py", "cluster/gpu_check/megatron.py"),
        ("cluster/gpu_check/megatron.py", "cluster/gpu_check/fp8.py"),
        ("cluster/plan/memory.py", "cluster/plan/search.py"),
        ("training/engines/deepspeed.py", "training/engines/megatron.py"),
        ("data_pipeline/loader/batching.py", "data_pipeline/loader/dataset.py"),
        ("data_pipeline/sources/wds.py", "data_pipeline/sources/parquet.py"),
        ("data_pipeline/sources/wds.py", "data_pipeline/sources/folders.py"),
        ("models/t2i/generation.py", "models/c2i/generation.py"),
        ("eval/benchmarks/geneval.py", "eval/benchmarks/shapes.py"),
        ("cluster/demo/stages.py", "cluster/demo/distill.py"),
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


# ---- one source of truth: registries instead of string switches, every setting declared once ----------------------

PRODUCT = ("models", "training", "data_pipeline", "eval", "cluster")


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the repository modules it imports (at any level, `if TYPE_CHECKING:` blocks excluded)."""
    files = {module_name(p): p for p in product_files()}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for me, path in files.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        names = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                names |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[me] = {r for r in map(resolve, (n for n in names if n.split(".")[0] in PRODUCT)) if r and r != me}
    return graph


def test_no_import_cycles():
    graph, seen, cycles = import_graph(), set(), []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            walk(start, [start])
    assert not cycles, cycles


def test_the_engine_kind_is_read_only_by_the_engines_and_the_config_loader():
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in product_files()
        if not str(p.relative_to(REPO)).startswith(("training/engines/", "training/config.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "engine.kind" in line
    ]
    assert not hits, hits


def string_switches(path: Path) -> list[str]:
    """Comparisons of a `.kind` / `.task` / `.source` attribute with string constants (`x.kind == "t2i"`,
    `args.task in ("dpg", ...)`): what a registry lookup replaces."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        attrs = [s for s in sides if isinstance(s, ast.Attribute) and s.attr in ("kind", "task", "source")]
        consts = [
            s
            for s in sides
            if (isinstance(s, ast.Constant) and isinstance(s.value, str))
            or (isinstance(s, ast.Tuple | ast.List | ast.Set) and all(isinstance(e, ast.Constant) for e in s.elts))
        ]
        if attrs and consts:
            out.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_product_code_switches_on_a_family_engine_source_or_benchmark_name():
    hits = [hit for p in product_files() for hit in string_switches(p)]
    assert not hits, hits


def constants(value) -> list[str]:
    return [
        f"{p.relative_to(REPO)}:{node.lineno}"
        for p in product_files()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value
    ]


@pytest.mark.parametrize(
    "value,home",
    [
        ("rowwise", "training/fp8.py"),  # the torchao FP8 recipe list
        (989.0, "training/flops.py"),  # the H100/H200 BF16 peak
    ],
)
def test_a_constant_is_typed_once(value, home):
    places = sorted(set(constants(value)))
    assert len(places) == 1 and places[0].startswith(home), places


def test_the_parallel_suffix_of_model_names_is_parsed_once():
    hits = [
        f"{p.relative_to(REPO)}:{node.lineno}"
        for p in product_files()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"\\d\+\)\??x", node.value)
    ]
    assert hits and all(h.startswith("models/core/names.py") for h in hits), hits


def test_attention_auto_is_resolved_once():
    hits = [
        f"{p.relative_to(REPO)}:{node.lineno}"
        for p in product_files()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Compare)
        and any(isinstance(s, ast.Constant) and s.value == "auto" for s in (node.left, *node.comparators))
        and re.search(r"attention|backend", ast.unparse(node))
    ]
    assert len(hits) == 1 and hits[0].startswith("models/core/attention.py"), hits


@pytest.mark.parametrize("setting", ["token_budget", "caption_dropout", "num_workers", "shuffle_buffer"])
def test_a_setting_is_declared_with_a_default_once(setting):
    """Dataclass fields (and function parameters) that give the setting a default: one, in the class that owns it."""
    places = []
    for p in product_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                if node.target.id == setting:
                    places.append(f"{p.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                places += [
                    f"{p.relative_to(REPO)}:{node.lineno}"
                    for a, d in zip(args, defaults, strict=True)
                    if a.arg == setting and d is not None
                ]
    assert len(places) <= 1, places
