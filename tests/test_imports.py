"""Imports run one way: no module of the package imports, directly or through others, a module that imports it.

Every import counts, at the top of a file or inside a function: a deferred import is still a dependency.
"""

import ast
import os

from helpers import REPO

PACKAGE = os.path.join(REPO, "jaxdiff")


def _modules() -> dict[str, str]:
  """{dotted name: file} of every module of the package (a package is its __init__)."""
  modules = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        parts = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(root, name)
  return modules


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from pkg import sub` depends on the submodule when there is one, else on pkg.
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                   for a in node.names]
      else:
        continue
      graph[name] |= {t for t in targets if t in modules and t != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_cycles():
  graph = import_graph()
  assert "jaxdiff.cli" in graph and "jaxdiff.train.loop" in graph["jaxdiff.cli"]  # the walk sees deferred imports
  assert cycles(graph) == []


def test_the_check_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_down():
  graph = import_graph()
  for job in ("jaxdiff.train.loop", "jaxdiff.sampling", "jaxdiff.likelihood", "jaxdiff.convert"):
    assert "jaxdiff.cli" not in graph[job], job  # the CLI sits above the jobs
  assert "jaxdiff.convert" not in graph["jaxdiff.train.experiment"]  # the trainer never converts
