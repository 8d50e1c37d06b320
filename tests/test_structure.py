"""The shape of the code: imports that flow one way, modules that can be read in one sitting, flags that
mean one thing."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import engine
import evaluate
import export
import hyperparameter_tune
import main
import modified_models
import predict
import transfer_learning
import tsne
import visualize
from benchmarks import bench_airbench_reference, bench_fast, bench_startup

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    """Every module of the project (tests aside), named as Python imports it."""
    modules = {}
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[0] in ("tests", ".git") or any(part.startswith(".") for part in parts):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_project_modules(path: Path, package: str, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(module, imported inside a function) for each import of a project module in ``path``."""
    found = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - child.level + 1], base]).strip(".")
                names = [f"{base}.{alias.name}" for alias in child.names] + [base]
            for name in names:
                module = resolve(name)
                if module:
                    found.append((module, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = project_modules()
    graph, hidden = {}, []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = imported_project_modules(path, package, modules)
        graph[name] = {module for module, _ in imports if module != name}
        hidden += [
            f"{name} imports {module} inside a function" for module, inside in imports if inside and module != name
        ]
    # loaded on first use: imports all the same
    graph["engine"] |= {f"engine.{module}" for module in engine.ON_FIRST_USE}
    return graph, hidden


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module], path[len(path) :] = "open", [module]
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state and (found := walk(imported)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := walk(module)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_project_imports_flow_one_way_and_never_hide_inside_a_function():
    graph, hidden = import_graph()
    assert {"functions", "engine", "engine.run", "models", "models.study", "tsne", "main"} <= set(graph)
    assert cycle_in(graph) is None, f"import cycle: {' -> '.join(cycle_in(graph))}"
    assert hidden == []


@pytest.mark.parametrize(
    "lower, higher",
    [
        ("functions", "engine"),
        ("engine", "models"),
        ("engine", "tsne"),
        ("models", "tsne"),
        ("engine", "analyses"),
        ("analyses", "tsne"),
        ("engine", "tuning"),
        ("tuning", "hyperparameter_tune"),
        ("engine", "saved_models"),
        ("models", "saved_models"),
        ("saved_models", "predict"),
        ("saved_models", "evaluate"),
        ("saved_models", "export"),
        ("engine", "main"),
        ("models", "main"),
        ("tsne", "main"),
    ],
)
def test_no_layer_imports_one_above_it(lower, higher):
    graph, _ = import_graph()
    offenders = {
        module: sorted(target for target in imports if target == higher or target.startswith(higher + "."))
        for module, imports in graph.items()
        if module == lower or module.startswith(lower + ".")
    }
    assert not any(offenders.values()), offenders


SCRIPT_NAMES = (
    "main.py",
    "modified_models.py",
    "hyperparameter_tune.py",
    "transfer_learning.py",
    "predict.py",
    "evaluate.py",
    "tsne.py",
    "export.py",
    "visualize.py",
)


def test_the_engine_names_no_analysis_and_no_script():
    """Analyses own their settings and files (engine.register_analysis_settings, register_run_outputs), and a model
    names the script of its own (ModelSpec.own_script): the engine carries them without knowing them."""
    named = {
        f"{path.name}:{number}": line.strip()
        for path in sorted((REPO / "engine").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "tsne" in line.lower() or "t-sne" in line.lower() or any(script in line for script in SCRIPT_NAMES)
    }
    assert named == {}


def test_every_module_can_be_read_in_one_sitting():
    long = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}


SCRIPTS = {
    "main.py": main.main,
    "modified_models.py": modified_models.main,
    "transfer_learning.py": transfer_learning.main,
    "tsne.py": tsne.main,
    "hyperparameter_tune.py": hyperparameter_tune.main,
    "predict.py": predict.main,
    "evaluate.py": evaluate.main,
    "export.py": export.main,
    "visualize.py": visualize.main,
    "bench_fast": bench_fast.main,
    "bench_airbench_reference": bench_airbench_reference.main,
    "bench_startup": bench_startup.main,
}


def parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """Every script's and benchmark's command line, as its argparse parser (caught as it parses, before any work)."""
    captured = []

    def capture(parser, args=None, namespace=None):
        captured.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for script in SCRIPTS.values():
        with pytest.raises(SystemExit):
            script()
    return dict(zip(SCRIPTS, captured, strict=True))


def test_help_all_shows_every_flag_a_script_takes(monkeypatch, capsys):
    """--help leaves advanced flags out; --help-all must show each option string the parser takes."""
    scripts = {name: parser for name, parser in parsers(monkeypatch).items() if name.endswith(".py")}
    assert len(scripts) == 9
    for name, parser in scripts.items():
        with pytest.raises(SystemExit):
            parser.parse_known_args(["--help-all"])
        text = capsys.readouterr().out
        missing = [flag for action in parser._actions for flag in action.option_strings if flag not in text]
        assert missing == [], f"{name} --help-all does not show {missing}"


def test_a_flag_takes_the_same_choices_in_every_script(monkeypatch):
    seen: dict[str, dict[str, tuple]] = {}
    for prog, parser in parsers(monkeypatch).items():
        for action in parser._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, {})[prog] = (tuple(action.choices or ()), action.type, action.dest)
    assert {"--device", "--data-dir", "--seed", "--scheduler", "--augment", "--tta"} <= set(seen)
    for flag in (
        "--device",
        "--data-dir",
        "--num-workers",
        "--limit-train",
        "--scheduler",
        "--augment",
        "--tta",
        "--precision",
        "--out-dir",
        "--resume",
        "--overwrite",
        "--no-tsne",
        "--tsne-samples",
        "--tsne-method",
    ):
        assert len(set(seen[flag].values())) == 1, (flag, seen[flag])
    # one set of schedules for every script, transfer learning's too
    assert "plateau" in seen["--scheduler"]["main.py"][0]


def fenced_blocks(markdown: str, heading: str) -> list[str]:
    """The command lines of the fenced code blocks under ``heading`` (up to the next heading of its level)."""
    level = heading.split(" ")[0]
    section = markdown.split(f"\n{heading}\n", 1)[1].split(f"\n{level} ", 1)[0]
    return [line for block in section.split("```")[1::2] for line in block.splitlines()[1:] if line.strip()]


def test_ci_runs_the_readmes_setup_and_test_commands_in_a_new_environment():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    setup, test = fenced_blocks(readme, "## Setup and first run")[0], fenced_blocks(readme, "## Tests")[0]
    assert (setup, test) == ("pip install -r requirements.txt", "python -m pytest -q")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert setup in commands and commands[-1] == test  # verbatim, the tests last
    assert commands.index(setup) > next(
        i for i, line in enumerate(commands) if line.startswith("source ") and "venv/bin/activate" in line
    )
    assert "python3 -m venv" in ci and "--system-site-packages" not in ci and "rm -rf" in ci
    assert not (REPO / ".ci" / "constraints.txt").exists()
    # no constraints file
    assert not [line for line in commands if "pip install" in line and (" -c " in line or "--constraint" in line)]
