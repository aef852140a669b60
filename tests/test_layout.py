"""The shape of the code: imports run one way (no cycle, no project import hidden in a function), no module
over 600 lines, and ruff's checks (lines of at most 120 characters, no undefined or unused names)."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT


def project_modules():
    """Module name -> path of every top-level script and module and of every package's modules."""
    paths = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "__init__.py"))
    paths += [p for d in {os.path.dirname(p) for p in paths if p.endswith("__init__.py")}
              for p in glob.glob(os.path.join(d, "*.py"))]
    names = {}
    for p in paths:
        rel = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
        names[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = p
    return names


def imported(node, package):
    """The module names an import statement names (relative imports resolved against `package`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph():
    """module -> {project modules it imports}, and the project imports made inside functions."""
    mods = project_modules()
    edges, inner = {m: set() for m in mods}, []
    for m, path in mods.items():
        tree = ast.parse(open(path).read())
        package = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported(node, package):
                if name in mods and name != m:
                    edges[m].add(name)
                    if id(node) in in_function:
                        inner.append(f"{m} imports {name} inside a function")
    return edges, inner


def find_cycle(edges):
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        state[u] = "done"
        stack.pop()
        return None
    return next((c for m in sorted(edges) if m not in state and (c := visit(m))), None)


def test_imports_run_one_way():
    edges, inner = import_graph()
    assert "peers" in edges and "checkpoints" in edges["convert"]   # the graph sees packages and scripts
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    assert not inner, inner
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_no_module_over_600_lines():
    long = {m: n for m, p in project_modules().items() if (n := sum(1 for _ in open(p))) > 600}
    assert not long, long


def test_ruff_is_clean():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", ROOT],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
