"""The package's wings and what each may import (HACKING.md, "Layout"), checked statically on every module.

A rule broken fails with the importing module, the line and the imported name, so the fix is obvious:
- the core (top-level modules of gpu_router) imports no wing;
- the wrapper wing (what runs before every job) imports only the core, and at module level only cheap builtins;
- the daemon wing imports only the core (never ops, never the wrapper's hot-path modules);
- the ops wing may import anything;
- the entry points (main, __main__) dispatch to the wrapper and ops, lazily.
"""
import ast
import pathlib

import pytest

AGENT = pathlib.Path(__file__).resolve().parent.parent / "agent"
WINGS = ("wrapper", "daemon", "ops")
ENTRY = {"main", "__main__"}
# Module-level imports allowed in the core and the wrapper: builtins and stdlib modules measured cheap (HACKING.md).
CHEAP = {"os", "sys", "fcntl", "marshal", "time", "errno", "select", "_socket", "_signal", "stat", "struct"}
MAY_IMPORT = {
    "core": {"core"},
    "wrapper": {"core", "wrapper"},
    "daemon": {"core", "daemon"},
    "ops": {"core", "wrapper", "daemon", "ops"},
    "entry": {"core", "wrapper", "ops", "entry"},
}


def _modules():
    for path in sorted(AGENT.rglob("*.py")):
        rel = path.relative_to(AGENT).with_suffix("")
        yield path, ("gpu_router",) + rel.parts


def _room(parts):
    """Which room a module (a tuple of name parts below gpu_router) lives in."""
    if len(parts) >= 2 and parts[1] in WINGS:
        return parts[1]
    if len(parts) >= 2 and parts[1] in ENTRY:
        return "entry"
    return "core"


def _imports(path, parts):
    """(line, absolute gpu_router module parts, at module level?) for every import of the package, resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = parts[:-1]  # a module's package; for __init__ the package itself
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, tuple(alias.name.split(".")), id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = base + (tuple(node.module.split(".")) if node.module else ())
            else:
                mod = tuple(node.module.split("."))
            for alias in node.names:
                full = mod + (alias.name,)
                # `from pkg import module` names a module when that file exists; else it is a name in pkg.
                target = full if (AGENT.joinpath(*full[1:]).with_suffix(".py").exists()
                                  or AGENT.joinpath(*full[1:]).is_dir()) else mod
                yield node.lineno, target, id(node) in top


MODULES = list(_modules())


def test_every_module_is_in_a_known_room():
    rooms = {".".join(p): _room(p) for _, p in MODULES}
    assert set(rooms.values()) <= set(MAY_IMPORT), rooms
    assert {p[1] for _, p in MODULES if len(p) > 2} <= set(WINGS), "a sub-package that is not a wing"


@pytest.mark.parametrize("path,parts", MODULES, ids=[".".join(p) for _, p in MODULES])
def test_imports_follow_the_wing_rules(path, parts):
    room = _room(parts)
    broken = []
    for line, target, at_top in _imports(path, parts):
        if target[0] == "gpu_router":
            if len(target) == 1:
                continue  # the package itself (its __init__ is empty)
            to = _room(target)
            if to not in MAY_IMPORT[room]:
                broken.append(f"{path.relative_to(AGENT.parent)}:{line}: {room} imports {'.'.join(target)} ({to})")
        elif room in ("core", "wrapper") and at_top and target[0] not in CHEAP:
            broken.append(f"{path.relative_to(AGENT.parent)}:{line}: {room} imports {'.'.join(target)} at module "
                          f"level (hot path: only {sorted(CHEAP)}; import it lazily where it is needed)")
    assert not broken, "\n".join(broken)


def test_the_rules_catch_a_broken_import(tmp_path):
    """The checker itself: a core module importing a wing, and a wrapper importing json at the top, are caught."""
    fake = tmp_path / "agent"
    (fake / "wrapper").mkdir(parents=True)
    (fake / "ops").mkdir()
    (fake / "ops" / "cli.py").write_text("")
    (fake / "policy.py").write_text("from .ops import cli\n")
    (fake / "wrapper" / "run.py").write_text("import json\nfrom .. import policy\n")
    globals()["AGENT"], saved = fake, AGENT
    try:
        with pytest.raises(AssertionError, match=r"policy.py:1: core imports gpu_router.ops.cli \(ops\)"):
            test_imports_follow_the_wing_rules(fake / "policy.py", ("gpu_router", "policy"))
        with pytest.raises(AssertionError, match=r"run.py:1: wrapper imports json at module level"):
            test_imports_follow_the_wing_rules(fake / "wrapper" / "run.py", ("gpu_router", "wrapper", "run"))
    finally:
        globals()["AGENT"] = saved
