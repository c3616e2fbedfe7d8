"""The real-systemd lane: a session-scoped booted container (see harness.py and README.md here).

Without root, systemd-nspawn or debootstrap the lane is skipped with the reason, except where it is required
(env CI set, or GPU_ROUTER_REQUIRE_SYSTEMD=1): then every test of the lane fails with the reason, so the lane never
vanishes silently from CI.
"""
import contextlib
import pathlib
import signal
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `import harness` from the lane's tests, whatever pytest's import mode
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from harness import require_lane  # noqa: E402

_TIMINGS: dict[str, float] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "systemd: needs the booted systemd-nspawn container (tests/systemd)")


def pytest_collection_modifyitems(config, items):
    for item in items:  # everything under tests/systemd is in the lane, marked or not: `-m "not systemd"` skips it
        if HERE in pathlib.Path(str(getattr(item, "path", item.fspath))).resolve().parents:
            item.add_marker(pytest.mark.systemd)


@pytest.fixture(autouse=True)
def _systemd_lane_available():
    """Every test here, with or without the shared container, skips (or fails where required) alike."""
    require_lane()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A SIGTERM (CI timeout, kill) becomes KeyboardInterrupt, so pytest still tears the container down."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def container():
    """A started harness.Container (Debian bookworm, systemd booted), shared by the whole session.

    The repo is at /src (read-only), a writable scratch dir at /scratch (host: container.scratch). Tests must not
    leave units running that other tests would trip over; use unique unit names.
    """
    require_lane()
    with _sigterm_as_interrupt():
        c = harness.Container()
        c.start()
        try:
            _TIMINGS.update(c.timings)
            yield c
        finally:
            c.stop()
            _TIMINGS.update(c.timings)


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        parts = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in _TIMINGS.items() if k.endswith("_s"))
        terminalreporter.write_line(f"systemd lane: {parts}")
