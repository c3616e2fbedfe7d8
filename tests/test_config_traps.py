"""Config traps an operator met on day one (issue 10): a profile whose binary is gpu-router itself, threshold_unit
as free text, and values written with their units ("1h", "90min", "11G")."""

import os

import pytest

from gpu_router import config


def load(tmp_path, profile, extra=""):
    path = tmp_path / "config.toml"
    path.write_text(extra + "[workloads.w]\n" + profile)
    return config.load(str(path), use_cache=False)


def error(tmp_path, profile):
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, profile)
    return info.value


# ---- trap 1: the wrapped name as the profile's binary --------------------------------------------------------

def test_binary_that_is_the_wrapped_name_is_a_config_error_naming_the_real_one(tmp_path):
    launcher = tmp_path / "gpu-router"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    wrapped = tmp_path / "whisper-ctranslate2"
    os.symlink(launcher, wrapped)  # what `gpu-router wrap` leaves at the wrapped path
    (tmp_path / "whisper-ctranslate2.distrib").write_text("#!/bin/sh\n")
    err = error(tmp_path, f'binary = "{wrapped}"\nthreshold = 1\n')
    assert err.key == "workloads.w.binary"
    assert "gpu-router itself" in str(err)
    assert f'set binary = "{wrapped}.distrib"' in str(err)


def test_binary_that_is_the_launcher_itself_is_refused(tmp_path):
    launcher = tmp_path / "gpu-router"
    launcher.write_text("#!/bin/sh\n")
    err = error(tmp_path, f'binary = "{launcher}"\nthreshold = 1\n')
    assert err.key == "workloads.w.binary" and "real program" in str(err)


def test_real_binary_is_fine(tmp_path):
    real = tmp_path / "whisper.distrib"
    real.write_text("#!/bin/sh\n")
    assert load(tmp_path, f'binary = "{real}"\nthreshold = 1\n').workload("w").binary == str(real)


# ---- trap 2: threshold_unit per probe, with conversions --------------------------------------------------------

def test_minutes_with_a_duration_probe_is_converted(tmp_path):
    w = load(tmp_path, 'binary = "/bin/w"\nprobe = "ffprobe-duration"\nthreshold = 60\n'
                       'threshold_unit = "minutes"\n').workload("w")
    assert (w.threshold, w.threshold_unit) == ([3600], ["seconds"])


@pytest.mark.parametrize("probe,unit", [("ffprobe-duration", "bytes"), ("file-size", "minutes"),
                                        ("image-pixels", "seconds"), ("line-count", "MiB-ish")])
def test_a_unit_the_probe_does_not_measure_in_is_refused_by_name(tmp_path, probe, unit):
    err = error(tmp_path, f'binary = "/bin/w"\nprobe = "{probe}"\nthreshold = 60\nthreshold_unit = "{unit}"\n')
    assert err.key == "workloads.w.threshold_unit"
    assert f"probe {probe!r} measures in" in str(err) and repr(unit) in str(err)


@pytest.mark.parametrize("probe,threshold,expected", [
    ("ffprobe-duration", '"1h"', 3600.0), ("mediainfo-duration", '"90min"', 5400.0),
    ("file-size", '"11G"', 11 * 1024 ** 3), ("file-size", '"2GB"', 2 * 10 ** 9)])
def test_thresholds_with_their_unit(tmp_path, probe, threshold, expected):
    w = load(tmp_path, f'binary = "/bin/w"\nprobe = "{probe}"\nthreshold = {threshold}\n').workload("w")
    assert w.threshold == [expected]


def test_a_duration_string_for_a_size_probe_is_refused(tmp_path):
    err = error(tmp_path, 'binary = "/bin/w"\nprobe = "file-size"\nthreshold = "1h"\n')
    assert err.key == "workloads.w.threshold" and "11G" in str(err)


def test_command_probe_keeps_its_authors_unit(tmp_path):
    w = load(tmp_path, 'binary = "/bin/w"\nprobe = "command"\nprobe_command = ["/bin/cat", "{input}"]\n'
                       'threshold = 5\nthreshold_unit = "MiB-ish"\n').workload("w")
    assert (w.threshold, w.threshold_unit) == ([5], ["MiB-ish"])


def test_product_units_convert_per_factor(tmp_path):
    w = load(tmp_path, 'binary = "/bin/w"\nprobe = ["ffprobe-duration", "video-pixels"]\ncombine = "product"\n'
                       'threshold = 2\nthreshold_unit = "minutes*megapixels"\n').workload("w")
    assert (w.threshold, w.threshold_unit) == ([120 * 10 ** 6], ["seconds*pixels"])


def test_sizes_in_mib_keys(tmp_path):
    cfg = load(tmp_path, 'binary = "/bin/w"\nthreshold = 1\ngpu_vram_mb = "3.5G"\ncpu_ram_mb = "11G"\n'
                         'cpu_memory_max = "12G"\n', extra='[host]\nram_mb = "64G"\n')
    w = cfg.workload("w")
    assert (w.gpu_vram_mb, w.cpu_ram_mb, w.cpu_memory_max, cfg.host.ram_mb) == (3584, 11264, 12288, 65536)
    err = error(tmp_path, 'binary = "/bin/w"\nthreshold = 1\ncpu_ram_mb = "11 parsecs"\n')
    assert err.key == "workloads.w.cpu_ram_mb" and "11G" in str(err)
