"""The import direction of the three packages, read from the source (every import, also those
inside functions): `ap_xla` may import `bridge` and `passes`, `bridge` may import `passes`,
`passes` imports neither (nor torch), and no module imports itself back through others.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("ap_xla", "bridge", "passes")
# Top-level names a package must never import (directly or inside a function).
FORBIDDEN = {
    "passes": {"torch", "torchax", "transformers", "accelerate", "peft", "bridge", "ap_xla"},
    "bridge": {"ap_xla"},
}


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the three packages."""
  out = {}
  for pkg in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
          if rel[-1] == "__init__":
            rel = rel[:-1]
          out[".".join(rel)] = os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
  """Every module `name` imports: `from a.b import c` is a.b.c when that is a module, else a.b."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".") if is_pkg else name.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        found.add(sub if sub in MODULES else base)
  return found


GRAPH = {m: {i for i in _imports(m, p) if i in MODULES} for m, p in MODULES.items()}
TOPS = {m: {i.split(".")[0] for i in _imports(m, p)} for m, p in MODULES.items()}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_one_way(package):
  bad = {m: sorted(TOPS[m] & FORBIDDEN[package]) for m in MODULES
         if m.split(".")[0] == package and TOPS[m] & FORBIDDEN[package]}
  assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_no_import_cycles():
  """Tarjan's strongly connected components over the module graph: each must be one module."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(GRAPH[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in GRAPH[v]:
        cycles.append(sorted(comp))

  for m in sorted(GRAPH):
    if m not in index:
      visit(m)
  assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_scan_sees_the_packages():
  """The checks above read real modules and real edges (a scan that found nothing would pass)."""
  assert {"ap_xla.api", "ap_xla.torch_frontend.session", "bridge.program", "passes.search"} <= set(MODULES)
  assert "passes.search" in GRAPH["ap_xla.api"] or "ap_xla.plan_cache" in GRAPH["ap_xla.api"]
  assert "torch" in TOPS["bridge.program"] and "passes.program" in GRAPH["bridge.program"]
