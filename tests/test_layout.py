"""The package's dependency rules (README, "Architecture"): every module sits in one layer and imports only from its
own layer or the layers below, so data knows no model, evaluation never depends on training, and models know
neither training nor the command line. Checked on the source, function-local imports included."""

import ast
from pathlib import Path

import maetok

PACKAGE = Path(maetok.__file__).parent

# lowest first; a unit is a top-level module or subpackage of maetok
LAYERS = [
    ("base", {"maetok", "maetok.config", "maetok.runs", "maetok.assets", "maetok.compat", "maetok.errors",
              "maetok.global_batch"}),
    ("data", {"maetok.data"}),
    ("models", {"maetok.models", "maetok.targets", "maetok.losses", "maetok.model_folders"}),
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


def _source(relative: str) -> str:
    return (PACKAGE / relative).read_text()


def test_model_folders_have_one_home():
    """Reading, writing, detecting and uploading model folders lives in maetok/model_folders.py: the model files keep
    only modules (their from_pretrained / save_pretrained / push_to_hub hand over to it), and nothing else names the
    folder's files or its model_type."""
    folder_words = ("MODEL_CONFIG", "MODEL_WEIGHTS", "model_type", "safetensors", "HfApi", "read_config_json")
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        if relative in ("model_folders.py", "runs.py") or not relative.startswith(("models/", "diffusion/", "cli.py")):
            continue
        code = "\n".join(line for line in _source(relative).splitlines() if not line.strip().startswith(("#", '"')))
        tree = ast.parse(_source(relative))
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not names & set(folder_words), f"{relative} handles model folders itself: {names & set(folder_words)}"
        assert "from safetensors" not in code, relative
    for relative in ("models/tokenizer.py", "models/sit.py"):
        tree = ast.parse(_source(relative))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("from_pretrained", "save_pretrained", "push_to_hub"):
                imported = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
                assert imported == {"maetok.model_folders"}, f"{relative}:{node.lineno} {node.name}"
    # one builder of diffusion models and one config of their architecture
    definitions = [(str(path.relative_to(PACKAGE)), node.name) for path in PACKAGE.rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                   and (node.name.startswith("build_") and node.name.endswith(("_model", "sit", "lightningdit"))
                        or node.name.endswith(("SiTConfig", "LightningDiTConfig", "TransformerConfig")))]
    assert definitions == [("models/sit.py", "build_diffusion_model")], definitions


# the modules whose random draws all come from keyed per-sample draws (maetok.global_batch.SampleRandom)
KEYED_DRAWS_ONLY = [*sorted((PACKAGE / "models").rglob("*.py")), *sorted((PACKAGE / "losses").rglob("*.py")),
                    PACKAGE / "diffusion" / "transport.py"]


def _randomness_problems(path: Path) -> list[str]:
    """A torch.Generator path beside the keyed draws in one file: ``RandomSource``, ``torch.Generator``, an
    ``isinstance(..., SampleRandom)`` branch, a ``generator`` parameter or ``generator=`` argument."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        found = None
        if (isinstance(node, ast.Name) and node.id == "RandomSource") or \
                (isinstance(node, ast.alias) and node.name == "RandomSource"):
            found = "RandomSource"
        elif isinstance(node, ast.Attribute) and node.attr == "Generator" and ast.unparse(node.value) == "torch":
            found = "torch.Generator"
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                any(a.name == "Generator" for a in node.names):
            found = "from torch import Generator"
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" and len(node.args) == 2 \
                and "SampleRandom" in ast.unparse(node.args[1]):
            found = "an isinstance(..., SampleRandom) branch"
        elif isinstance(node, ast.arg) and node.arg == "generator":
            found = "a generator parameter"
        elif isinstance(node, ast.keyword) and node.arg == "generator":
            found = "a generator= argument"
        if found:
            problems.append(f"{path.name}:{getattr(node, 'lineno', '?')}: {found}")
    return sorted(problems)


def test_one_randomness_path():
    """Models, losses and the transport draw every random number from the caller's keyed draws (one path, no
    torch.Generator beside them); the draws and the multi-process helpers sit in the base layer, not in models/."""
    assert not (PACKAGE / "models" / "global_batch.py").exists()
    assert LAYERS[LAYER_OF["maetok.global_batch"]][0] == "base" and (PACKAGE / "global_batch.py").exists()
    assert len(KEYED_DRAWS_ONLY) > 10
    assert [problem for path in KEYED_DRAWS_ONLY for problem in _randomness_problems(path)] == []


def test_the_randomness_checker_sees_a_generator_path(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("import torch\nfrom maetok.global_batch import RandomSource, SampleRandom\n"
                      "def draw(n, generator=None):\n"
                      "    if isinstance(generator, SampleRandom):\n        return generator.uniform('x')\n"
                      "    return torch.rand(n, generator=torch.Generator())\n")
    assert _randomness_problems(source) == [
        "bad.py:2: RandomSource", "bad.py:3: a generator parameter",
        "bad.py:4: an isinstance(..., SampleRandom) branch", "bad.py:6: a generator= argument",
        "bad.py:6: torch.Generator"]


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
