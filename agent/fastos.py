"""``os`` for the wrapper's hot path, without importing os: ``from . import fastos as os``.

``import os`` costs ~1.1 ms in the wrapper's ``python3 -IS`` process (os.environ's class pulls in
_collections_abc and its ABCs): a quarter of the wrapper's own work, for functions os merely re-exports from the
built-in ``posix``. Here they are posix's own (the same objects as os's); ``environ`` is decoded as os.environ
decodes it; ``path`` holds the few posixpath functions the hot path calls, for str paths, written as posixpath
writes them (any other path type, or another function, is posixpath's). Any name not here is the real os's,
imported on first use, so a rare path pays the import and never meets an AttributeError.

Where os is already loaded (the agent, the CLI, tests) this module *is* os (it replaces itself in sys.modules):
one os per process, monkeypatching os reaches every module, and os.environ stays live.
"""

import sys

if "os" in sys.modules:
    sys.modules[__name__] = sys.modules["os"]
else:
    import posix
    from posix import _path_normpath, getcwd, lstat, stat as _stat_fn

    SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2
    sep = "/"
    devnull = "/dev/null"

    def _real_path():
        import os

        return os.path

    class _Path:
        """posixpath's join, basename, dirname, normpath, abspath, isabs, lexists, isdir for str paths."""

        @staticmethod
        def join(a, *p):
            if type(a) is not str or any(type(b) is not str for b in p):
                return _real_path().join(a, *p)
            path = a
            for b in p:
                if b.startswith("/"):
                    path = b
                elif not path or path.endswith("/"):
                    path += b
                else:
                    path += "/" + b
            return path

        @staticmethod
        def basename(p):
            if type(p) is not str:
                return _real_path().basename(p)
            return p[p.rfind("/") + 1:]

        @staticmethod
        def dirname(p):
            if type(p) is not str:
                return _real_path().dirname(p)
            head = p[:p.rfind("/") + 1]
            if head and head != "/" * len(head):
                head = head.rstrip("/")
            return head

        @staticmethod
        def isabs(p):
            if type(p) is not str:
                return _real_path().isabs(p)
            return p.startswith("/")

        @staticmethod
        def normpath(p):
            if type(p) is not str:
                return _real_path().normpath(p)
            return _path_normpath(p) or "."

        @staticmethod
        def abspath(p):
            if type(p) is not str:
                return _real_path().abspath(p)
            if not p.startswith("/"):
                p = _Path.join(getcwd(), p)
            return _path_normpath(p) or "."

        @staticmethod
        def lexists(p):
            try:
                lstat(p)
            except (OSError, ValueError):
                return False
            return True

        @staticmethod
        def isdir(p):
            try:
                st = _stat_fn(p)
            except (OSError, ValueError):
                return False
            return (st.st_mode & 0o170000) == 0o040000

        def __getattr__(self, name):
            return getattr(_real_path(), name)

    path = _Path()

    def __getattr__(name):
        """posix's name (what os re-exports unchanged), else the real os's; kept here after the first use."""
        if name == "environ":  # os.environ's contents, decoded as os decodes them; read-only use on the hot path
            enc = sys.getfilesystemencoding()
            value = {k.decode(enc, "surrogateescape"): v.decode(enc, "surrogateescape")
                     for k, v in posix.environ.items()}
        elif hasattr(posix, name):
            value = getattr(posix, name)
        else:
            import os

            value = getattr(os, name)
        globals()[name] = value
        return value
