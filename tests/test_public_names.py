"""Names, not numbers, and no private names across modules (issue 20): another module uses only the public names
of config.py and journal.py, and no module compares an errno with a bare number (errno.ELOOP, not 40)."""

import ast
import pathlib

AGENT = pathlib.Path(__file__).resolve().parent.parent / "agent"
OWNED = {"config", "journal"}  # modules whose private names no other module may use


def _trees():
    for path in sorted(AGENT.rglob("*.py")):
        yield path.relative_to(AGENT), ast.parse(path.read_text())


def test_no_module_uses_a_private_name_of_config_or_journal():
    found = []
    for rel, tree in _trees():
        if rel.with_suffix("").name in OWNED and rel.parent == pathlib.Path("."):
            continue
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                for a in node.names:
                    if a.name in OWNED:
                        aliases.add(a.asname or a.name)
                    if (node.module or "") in OWNED and a.name.startswith("_"):
                        found.append(f"{rel}:{node.lineno}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


def test_no_errno_is_compared_with_a_bare_number():
    found = []
    for rel, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "errno":
                found += [f"{rel}:{node.lineno}: errno vs {e.value}" for c in node.comparators
                          for e in ([c] if isinstance(c, ast.Constant) else getattr(c, "elts", []))
                          if isinstance(e, ast.Constant) and isinstance(e.value, int)]
    assert found == []


def test_memfd_seals_and_nvml_codes_by_name():
    journal = (AGENT / "journal.py").read_text()
    assert "fcntl.F_ADD_SEALS" in journal and "os.MFD_ALLOW_SEALING" in journal and "0x000" not in journal
    backends = (AGENT / "daemon/gpu_backends.py").read_text()
    tree = ast.parse(backends)
    numbers = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Compare)
               and isinstance(node.left, ast.Attribute) and node.left.attr == "value"
               and any(isinstance(c, (ast.Constant, ast.Tuple)) for c in node.comparators)
               and any(isinstance(e, ast.Constant) for c in node.comparators
                       for e in ([c] if isinstance(c, ast.Constant) else getattr(c, "elts", [])))]
    assert numbers == [], f"NVML return codes compared as numbers at lines {numbers}: use pynvml.NVML_ERROR_*"
