"""The house by stage: imports only go down the floors, no circles, only ``sweep/`` imports
optuna, only ``toyworld/`` and ``bench/`` import the toy world, and no module keeps mutable state
at module level besides the documented caches. Every module of every subpackage is scanned,
imports inside functions included; the same checker is shown failing on a wrong tiny package."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "lora_lab"

# Bottom first: a module may import its own package and any floor below it, never one above.
FLOORS = [
    {"errors", "files", "images", "numbers", "versions", "plugins", "device"},  # ground
    {"report"},
    {"config"},
    {"cli"},
    {"models"},
    {"data"},
    {"lora"},
    {"train"},
    {"evaluate"},
    {"sweep"},
    {"calibrate"},
    {"toyworld"},
    {"bench"},
]
# Command entry points users type (python -m lora_lab.doctor ...): they may import anything.
COMMANDS = {"__init__", "doctor", "inspect", "caption", "leaderboard"}
OPTUNA_ROOMS = {"sweep"}
GUEST, GUEST_READERS = "toyworld", {"toyworld", "bench"}
# Module-level mutable state that is a documented cache (same answer for the same input).
CACHES = {"files._FILE_HASHES", "lora.kohya._INDEXES", "models.sdxl._TABLES"}


def _room(module: str) -> str:
    """``lora_lab.data.doctor`` -> ``data``; ``lora_lab.files`` -> ``files``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules(root: Path, package: str) -> Dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, package: str) -> Set[str]:
    """Every module ``path`` imports (at the top or inside functions), absolute names."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


_MUTATORS = {"update", "append", "add", "clear", "pop", "popitem", "setdefault", "extend", "insert",
             "remove", "discard", "__setitem__"}


def _mutable_globals(path: Path) -> List[str]:
    """Module-level containers (dict, list, set) the module changes after import, and names
    rebound through ``global``: state that makes a call's result depend on earlier calls.
    A table only read (``SAMPLERS = {...}``) is a constant and passes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    containers = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in
                {"dict", "list", "set", "defaultdict", "OrderedDict", "WeakKeyDictionary", "WeakValueDictionary"}):
            containers.update(t.id for t in targets if isinstance(t, ast.Name))
    changed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            changed.update(node.names)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for target in getattr(node, "targets", None) or [getattr(node, "target", None)]:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                    changed.add(target.value.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.attr in _MUTATORS:
            changed.add(node.func.value.id)
    return sorted(n for n in changed if n in containers or any(
        isinstance(g, ast.Global) and n in g.names for g in ast.walk(tree)))


def check(root: Path, package: str = "lora_lab") -> List[str]:
    """Every broken rule, one sentence each (empty: the house stands)."""
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    modules = _modules(root, package)
    problems: List[str] = []
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        room = _room(module)
        imported = _imports(path, module, package)
        inner = {m for m in imported if m in modules and m != module}
        graph[module] = inner
        if room not in floor and room not in COMMANDS:
            problems.append(f"{module}: {room} is on no floor")
        for target in sorted(inner):
            there = _room(target)
            if room in COMMANDS or there == room or there == "__init__":
                continue
            if there not in floor:
                continue
            if room in floor and floor[there] > floor[room]:
                problems.append(f"{module} imports {target}: up from {room} to {there}")
        if room not in OPTUNA_ROOMS and any(m == "optuna" or m.startswith("optuna.") for m in imported):
            problems.append(f"{module} imports optuna: only {sorted(OPTUNA_ROOMS)} may")
        guest = f"{package}.{GUEST}"
        if room not in GUEST_READERS and any(m == guest or m.startswith(guest + ".") for m in imported):
            problems.append(f"{module} imports the toy world: only {sorted(GUEST_READERS)} may")
        for name in _mutable_globals(path):
            key = f"{module.split('.', 1)[1] if '.' in module else module}.{name}"
            if key not in CACHES:
                problems.append(f"{module}.{name}: mutable state at module level")
    # Circles: a depth-first walk over the module graph (imports inside functions included).
    state: Dict[str, int] = {}

    def visit(node: str, trail: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                problems.append("circle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return problems


def test_the_house_stands():
    assert len(_modules(PACKAGE, "lora_lab")) > 60  # subpackages scanned, not just the top folder
    assert check(PACKAGE) == []


def test_every_stage_is_a_package_and_the_top_holds_only_ground_and_commands():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= FLOORS[0] | COMMANDS | {"cli"}
    for rooms in FLOORS[1:]:
        for room in rooms - {"cli"}:
            assert (PACKAGE / room / "__init__.py").is_file(), room


def _write(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "lora_lab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "lora_lab"


def test_the_checker_fails_on_a_wrong_tiny_package(tmp_path):
    wrong = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "files.py": "from lora_lab.data import dataset\n_SEEN = {}\nTABLE = {'a': 1}\n\n\n"  # up from the ground
                    "def note(key):\n    _SEEN[key] = TABLE['a']\n",  # hidden state; a read-only table is fine
        "data/__init__.py": "",
        "data/dataset.py": "def load():\n    from lora_lab.data import doctor\n",
        "data/doctor.py": "from lora_lab.data import dataset\nimport optuna\n",  # circle; optuna outside sweep/
        "evaluate/__init__.py": "",
        "evaluate/judge.py": "from lora_lab.toyworld import world\n",  # the product reads the guest
        "toyworld/__init__.py": "",
        "toyworld/world.py": "",
    })
    problems = check(wrong)
    assert "lora_lab.files imports lora_lab.data.dataset: up from files to data" in problems
    assert "lora_lab.files._SEEN: mutable state at module level" in problems
    assert not any("TABLE" in p for p in problems)
    assert any(p.startswith("circle: ") and "lora_lab.data.dataset" in p and "lora_lab.data.doctor" in p
               for p in problems)
    assert "lora_lab.data.doctor imports optuna: only ['sweep'] may" in problems
    assert "lora_lab.evaluate.judge imports the toy world: only ['bench', 'toyworld'] may" in problems
    # The same package with the wrongs taken out stands.
    right = _write(tmp_path / "fixed", {
        "__init__.py": "", "errors.py": "", "files.py": "from lora_lab import errors\nCACHE_SIZE = 3\n",
        "data/__init__.py": "", "data/dataset.py": "from lora_lab import files\n",
        "data/doctor.py": "from lora_lab.data import dataset\n",
    })
    assert check(right) == []
