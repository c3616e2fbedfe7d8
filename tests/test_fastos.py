"""agent/fastos.py: the wrapper's os without `import os` behaves as os does (the real os is the reference).

Each check runs in a fresh `python3 -IS` process, as the wrapper does, so the module is the stand-in, not os itself.
"""
import subprocess

from helpers import LIB

PYTHON = "/usr/bin/python3"

PATHS = ["", "/", "//", "///", "a", "/a", "a/", "/a/", "a//b", "/a/./b/../c", "a/b/..", "../x", "./", ".", "..",
         "/a/b/", "//a", "///a/b", "x/../../y", "/tmp/in put.bin", "é/ü", "a\udcff/b", "-", "--input=/x"]


def run(code, env=None):
    p = subprocess.run([PYTHON, "-IS", "-c", f"import sys\nsys.path.insert(0, {str(LIB)!r})\n" + code],
                       capture_output=True, text=True, env=env, cwd="/tmp")
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_it_is_not_os_in_the_wrappers_process_and_its_paths_are_posixpaths():
    out = run(f"""
from gpu_router import fastos
assert "os" not in sys.modules, "fastos imported os"
paths = {PATHS!r}
mine = []
for a in paths:
    mine.append(("basename", a, fastos.path.basename(a)))
    mine.append(("dirname", a, fastos.path.dirname(a)))
    mine.append(("isabs", a, fastos.path.isabs(a)))
    mine.append(("lexists", a, fastos.path.lexists(a)))
    mine.append(("isdir", a, fastos.path.isdir(a)))
    if a:
        mine.append(("normpath", a, fastos.path.normpath(a)))
    mine.append(("abspath", a, fastos.path.abspath(a)))
    for b in paths:
        mine.append(("join", (a, b), fastos.path.join(a, b)))
        mine.append(("join3", (a, b), fastos.path.join(a, b, "c")))
assert "os" not in sys.modules, "a path function imported os"
import os, posixpath
bad = []
for name, arg, got in mine:
    f = getattr(posixpath, name.rstrip("3"))
    want = f(*arg) if name == "join" else f(*arg, "c") if name == "join3" else f(arg)
    if got != want:
        bad.append((name, arg, got, want))
print(len(mine), bad)
""")
    count, bad = out.split(" ", 1)
    assert int(count) > 1000 and bad.strip() == "[]", bad


def test_environ_is_os_environ_decoded_the_same_way():
    env = {b"PATH": b"/usr/bin:/bin", b"PLAIN": b"x=y", b"UTF8": "é".encode(), b"RAW": b"\xff\xfe",
           b"EMPTY": b""}
    out = run("""
from gpu_router import fastos
mine = dict(fastos.environ)
assert "os" not in sys.modules
import os
print(mine == dict(os.environ), sorted(mine) == sorted(os.environ), mine.get("RAW") == os.environ.get("RAW"))
""", env=env)
    assert out.split() == ["True", "True", "True"], out


def test_posix_functions_are_os_own_and_anything_else_falls_back_to_os():
    out = run("""
from gpu_router import fastos
fns = {n: getattr(fastos, n) for n in ("open", "read", "fstat", "execve", "getpid", "set_inheritable", "_exit",
                                       "memfd_create", "O_NOFOLLOW", "SEEK_END", "devnull", "sep")}
assert "os" not in sys.modules
enc = fastos.fsencode("a")          # not posix's: os's own, imported on first use
real = fastos.path.realpath("/")    # the same for a posixpath function the stand-in does not have
import os
print(all(getattr(os, n) is v or getattr(os, n) == v for n, v in fns.items()), enc == b"a", real == "/")
""")
    assert out.split() == ["True", "True", "True"], out


def test_where_os_is_loaded_first_it_is_os_itself():
    out = run("import os\nfrom gpu_router import fastos\nprint(fastos is os)")
    assert out.strip() == "True"
