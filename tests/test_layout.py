"""The package's dependency rules (README, "Architecture"): every module sits in one layer and imports only from its
own layer or the layers below, so data knows no model, evaluation never depends on training, and models know
neither training nor the command line. Checked on the source, function-local imports included."""

import ast
from pathlib import Path

import maetok

PACKAGE = Path(maetok.__file__).parent

# lowest first; a unit is a top-level module or subpackage of maetok
LAYERS = [
    ("base", {"maetok", "maetok.config", "maetok.runs", "maetok.assets", "maetok.compat"}),
    ("data", {"maetok.data"}),
    ("models", {"maetok.models", "maetok.targets", "maetok.losses"}),
    ("diffusion", {"maetok.diffusion"}),
    ("encode", {"maetok.encode"}),
    ("eval", {"maetok.eval"}),
    ("train", {"maetok.train"}),
    ("jobs", {"maetok.pipeline", "maetok.bench"}),
    ("front ends", {"maetok.demo", "maetok.study", "maetok.cli", "maetok.integrations"}),
]
LAYER_OF = {unit: index for index, (_, units) in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported maetok module) of every import statement in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "maetok"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] == "maetok":
                found.append((node.lineno, module))
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _unit(_module_name(path))
        assert importer in LAYER_OF, f"{path.relative_to(PACKAGE.parent)}: {importer} has no layer in LAYERS"
        for line, module in _imports(path):
            imported = _unit(module)
            assert imported in LAYER_OF, f"{path.name}:{line} imports {module}, which has no layer in LAYERS"
            if LAYER_OF[imported] > LAYER_OF[importer]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} "
                                f"({LAYERS[LAYER_OF[importer]][0]}) imports {module} ({LAYERS[LAYER_OF[imported]][0]})")
    return problems


def test_every_import_points_down_the_layers():
    assert _violations() == []


def test_the_named_rules_hold():
    imports = {}
    for path in PACKAGE.rglob("*.py"):
        imports.setdefault(_unit(_module_name(path)), set()).update(_unit(m) for _, m in _imports(path))
    assert "maetok.models" not in imports["maetok.data"], "data must know no model"
    assert "maetok.train" not in imports["maetok.eval"], "measuring must not depend on training code"
    assert not {"maetok.train", "maetok.cli"} & imports["maetok.models"], "models know neither training nor the CLI"
    assert not {"maetok.train", "maetok.cli"} & imports["maetok.diffusion"]


def test_the_checker_sees_a_violation(tmp_path):
    """The scan catches function-local and relative imports (a checker that sees nothing proves nothing)."""
    source = tmp_path / "maetok" / "data" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..models.tokenizer import MAETok\n    import maetok.train.loop\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "maetok"
    try:
        assert _imports(source) == [(2, "maetok.models.tokenizer"), (3, "maetok.train.loop")]
    finally:
        PACKAGE = saved


def test_one_module_knows_the_latent_cache_files():
    """The latent cache's files are named and laid out in ``maetok/data/latents.py`` alone: no other module spells
    a file name or imports the names of its layout (the encoding loop calls its writer; docstrings may mention
    them)."""
    names = {"cache_plan.json", "stats.json", "skipped.json"}
    layout = {"PLAN_NAME", "STATS_NAME", "SKIPPED_NAME", "SKIPPED_METADATA_KEY", "shard_path", "read_shard_skips"}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            literal = isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in names or node.value.startswith("shard-"))
            imported = isinstance(node, ast.ImportFrom) and (node.module or "").endswith("latents") and any(
                alias.name in layout for alias in node.names)
            if literal or imported:
                found.add(path.relative_to(PACKAGE.parent).as_posix())
    assert found == {"maetok/data/latents.py"}
