"""`calibrate --chart` and `stats --chart` (issue 10): drawn with Debian's python3-matplotlib (a test dependency in
.ci/deps; the .deb only Suggests it), and a clear message where it is not installed."""

import json
import sys

import pytest

from fakenvml import fake_gpus  # noqa: F401  (a fixture)
from gpu_router.daemon import accounting
from gpu_router.ops import charts, stats
from test_calibrate import Cal

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cal(tmp_path, gr_bin, fake_gpus):
    fake_gpus.add_gpu(16384, name="NVIDIA Fake 16GB")
    return Cal(tmp_path, gr_bin, fake_gpus)


def _record(cal):
    for x in (1000, 3000, 5000):
        accounting.record_sample(str(cal.state), {"WORKLOAD": "fake", "MODE": "GPU", "METRIC": f"{x}",
                                                  "RESULT": "success", "PEAK_VRAM_MB": 800 + 0.5 * x,
                                                  "PEAK_RAM_MB": 300.0, "DURATION_S": 1.0})


def test_calibrate_chart_png_and_svg(cal, tmp_path):
    pytest.importorskip("matplotlib", reason="python3-matplotlib (.ci/deps installs it)")
    _record(cal)
    for name in ("fit.png", "fit.svg"):
        out = tmp_path / name
        d = cal.calibrate("--chart", out, job=None)
        assert d["chart"] == str(out) and d["fit"]["n"] == 3
        head = out.read_bytes()[:200]
        assert head.startswith(PNG) if name.endswith(".png") else b"<svg" in out.read_bytes()[:2000]


def test_calibrate_chart_with_a_bad_name_says_so(cal, tmp_path):
    _record(cal)
    p = cal.cli("calibrate", "--workload", "fake", "--chart", tmp_path / "fit.bmp")
    assert p.returncode == 1 and "name the chart file .png, .svg or .pdf" in p.stderr
    assert "fit" in p.stdout  # the report itself is still there


def test_without_matplotlib_the_message_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the real import machinery then raises ImportError
    with pytest.raises(charts.ChartError) as info:
        charts.calibration(str(tmp_path / "x.png"), "w", "seconds", [(1, 2)], None, None)
    assert "apt install python3-matplotlib" in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_stats_distribution_chart(tmp_path):
    pytest.importorskip("matplotlib", reason="python3-matplotlib (.ci/deps installs it)")

    def ev(kind, mode, metric):
        return {"GPU_ROUTER_EVENT": kind, "GPU_ROUTER_WORKLOAD": "w", "GPU_ROUTER_MODE": mode,
                "GPU_ROUTER_METRIC": metric, "GPU_ROUTER_UNIT": "seconds", "GPU_ROUTER_THRESHOLD": "3600"}

    events = [ev("routed", "GPU", str(60 * i)) for i in range(1, 50)] + \
        [ev("routed", "CPU", str(3600 + 100 * i)) for i in range(10)] + [ev("blocked", "BLOCKED", "120"),
                                                                          ev("routed", "CPU", "unknown")]
    per = stats.metrics_by_mode(events)
    assert (len(per["w"]["GPU"]), len(per["w"]["CPU"]), per["w"]["BLOCKED"], per["w"]["threshold"]) == (
        49, 10, [120.0], 3600.0)
    out = charts.distribution(str(tmp_path / "d.png"), per)
    assert open(out, "rb").read(8) == PNG
