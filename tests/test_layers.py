"""The package's import graph: no cycles, imports only downwards through the layers the README documents, every
module listed in the README's Layout section, and no task named in the task-agnostic modules."""

import ast
import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, "research")

# Lowest layer first; a module may import modules of its own layer or lower ones. Patterns match module names.
# The same list, in words, is in the README's Layout section.
LAYERS = [
    ("core", [r"research", r"research\.config", r"research\.cond", r"research\.images", r"research\.cli"]),
    (
        "math, models, data",
        [r"research\.diffusion(\..*)?", r"research\.models(\.(?!convert_).*)?", r"research\.data(\..*)?"],
    ),
    ("machinery", [r"research\.train\.(checkpoint|mesh|state|grads|distributed)", r"research\.run"]),
    ("shapes", [r"research\.shapes"]),
    (
        "runs and metrics",
        [
            r"research\.loader",
            r"research\.latents",
            r"research\.sampling",
            r"research\.metrics\.(?!convert_).*",
            r"research\.metrics",
        ],
    ),
    ("tasks", [r"research\.tasks(\..*)?"]),
    ("loop", [r"research\.train", r"research\.train\.loop"]),
    (
        "entry points",
        [
            r"research\.train\.__main__",
            r"research\.sample",
            r"research\.generate",
            r"research\.evaluate",
            r"research\.evaluate_clip",
            r"research\.summary",
            r"research\.pretrained(\..*)?",
            r"research\.metrics\.convert_.*",
            r"research\.models\.convert_.*",
        ],
    ),
]

# Modules that must stay free of task names: the loop, the sample command and the run loader talk to tasks only
# through the registry.
TASK_AGNOSTIC = ["research/train/loop.py", "research/sample.py", "research/loader.py", "research/run.py"]


def module_files(root=PACKAGE):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports_of(path, module, known):
    """research.* modules imported anywhere in the file (top level or inside functions)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from research.x import y` imports research.x.y when that is a module, else research.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("research") and name != module:
                found.add(name)
    return found


def import_graph(root=PACKAGE):
    files = module_files(root)
    return {m: imports_of(p, m, files) for m, p in files.items()}


def layer_of(module):
    for i, (_, patterns) in enumerate(LAYERS):
        if any(re.fullmatch(p, module) for p in patterns):
            return i
    return None


def find_cycle(graph):
    """One import cycle as a list of modules, or None (iterative DFS over the graph)."""
    state, stack_path = {}, []
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        stack_path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                stack_path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return stack_path[stack_path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                stack_path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def layer_violations(graph):
    out = []
    for module, deps in graph.items():
        lm = layer_of(module)
        for dep in deps:
            ld = layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{module} ({LAYERS[lm][0]}) imports {dep} ({LAYERS[ld][0]})")
    return sorted(out)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in module_files() if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer (add them to LAYERS and the README): {unplaced}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_imports_only_go_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_checker_finds_an_injected_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a copy of two modules importing each other, and a core module importing a task."""
    pkg = tmp_path / "research"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from research.tasks import diffusion\n")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "tasks" / "diffusion.py").write_text("def f():\n    from research import config\n")
    graph = import_graph(str(pkg))
    assert graph["research.config"] == {"research.tasks.diffusion"}
    assert find_cycle(graph) in (
        ["research.config", "research.tasks.diffusion", "research.config"],
        ["research.tasks.diffusion", "research.config", "research.tasks.diffusion"],
    )
    assert layer_violations(graph) == ["research.config (core) imports research.tasks.diffusion (tasks)"]


def test_readme_layout_lists_every_module():
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in module_files().values():
        rel = os.path.relpath(path, REPO_ROOT)
        name = os.path.basename(rel)
        folder = os.path.dirname(rel) + "/"
        if name == "__init__.py":
            if folder not in layout:
                missing.append(rel)
        elif name not in layout:
            missing.append(rel)
    assert not missing, f"the README's Layout section does not list: {missing}"


@pytest.mark.parametrize("path", TASK_AGNOSTIC)
def test_no_task_names_in_task_agnostic_modules(path):
    from research.tasks import task_names

    text = open(os.path.join(REPO_ROOT, path)).read()
    for name in task_names():
        assert not re.search(rf"""["']{name}["']|config\.{name}\b|tasks\.{name}\b""", text), (
            f"{path} names the task {name!r}"
        )
