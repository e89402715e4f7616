"""kvcat reaches vLLM through its public API only, and only from `server/vllm_adapter/`.

vLLM's KV-connector API is experimental; its private names (a leading underscore) change without notice, so a
version bump should only ever touch the adapter's public calls. Read as source (no vLLM needed): every
non-test file of the repository is parsed, and the test lists the offending lines.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "server" / "vllm_adapter"
SKIPPED = {".venv", ".git", "tests", "results", "node_modules", "build", "dist"}


def _sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if not SKIPPED & set(p.relative_to(ROOT).parts[:-1]))


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _vllm_imports(path: Path):
    """(node, module, imported names) of each import of vLLM in a file."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vllm":
                    yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            yield node, node.module, [alias.name for alias in node.names]


def _kvcat_names() -> set[str]:
    """Every name kvcat's own code defines: functions, classes, variables, attributes it assigns, arguments."""
    names = set()
    for path in _sources():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def _private_accesses(path: Path):
    """(node, name) of each `x._name` and `getattr(x, "_name")` (hasattr, setattr) in a file."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            yield node, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            yield node, node.args[1].value


def _in_vllm(name: str) -> bool:
    """Whether the installed vLLM's source names `name` (True when vLLM is not installed: the stricter reading)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return True
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    return any(pattern.search(p.read_text(errors="ignore"))
               for p in Path(spec.submodule_search_locations[0]).rglob("*.py"))


def test_only_the_adapter_imports_vllm():
    offenders = [f"{_where(path, node)}: {module}" for path in _sources() if ADAPTER not in path.parents
                 for node, module, _ in _vllm_imports(path)]
    assert not offenders, "vLLM imported outside server/vllm_adapter/:\n" + "\n".join(offenders)


def test_no_private_vllm_module_or_name_is_imported():
    offenders = [f"{_where(path, node)}: {module} {names}" for path in _sources()
                 for node, module, names in _vllm_imports(path)
                 if any(_private(part) for part in module.split(".")) or any(_private(n) for n in names)]
    assert not offenders, "private vLLM modules or names imported:\n" + "\n".join(offenders)


def test_no_private_vllm_attribute_is_read():
    """`obj._name` where kvcat does not define `_name` itself is another library's private attribute; the test
    fails on those that vLLM defines (the connector base's `_connector_metadata`, `_get_connector_metadata`...)."""
    ours = _kvcat_names()
    found = [(path, node, name) for path in _sources() for node, name in _private_accesses(path) if name not in ours]
    offenders = [f"{_where(path, node)}: {name}" for path, node, name in found if _in_vllm(name)]
    assert not offenders, "private vLLM attributes read (use the public connector API):\n" + "\n".join(offenders)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The parsers find the three kinds of offence in a sample."""
    sample = tmp_path / "sample.py"
    sample.write_text("from vllm._custom_ops import op\n"
                      "from vllm.v1.attention.backends.cpu_attn import _get_attn_isa\n"
                      "meta = getattr(group, '_connector_metadata', None)\n"
                      "meta = connector._get_connector_metadata()\n")
    imports = list(_vllm_imports(sample))
    assert [m for _, m, _ in imports] == ["vllm._custom_ops", "vllm.v1.attention.backends.cpu_attn"]
    assert imports[1][2] == ["_get_attn_isa"]
    assert [name for _, name in _private_accesses(sample)] == ["_connector_metadata", "_get_connector_metadata"]
