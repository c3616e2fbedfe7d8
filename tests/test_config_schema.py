"""The schema is the one table: the records' fields come from it, so a key added there reaches the record."""

import pathlib
import sys
import types

from gpu_router import config, configparse

SOURCE = pathlib.Path(config.__file__).read_text()
PARSE_SOURCE = pathlib.Path(configparse.__file__).read_text()


def _config_with(extra_line, after):
    """A fresh copy of agent/config.py with one schema line added after ``after`` (the module as a maintainer
    would edit it: one line in the schema, nothing else), its validation (configparse.py, unchanged) reading that
    copy's schema."""
    assert SOURCE.count(after) == 1, after
    module = types.ModuleType("gpu_router.config_edited")
    module.__package__ = "gpu_router"
    exec(compile(SOURCE.replace(after, after + "\n" + extra_line), config.__file__, "exec"), module.__dict__)
    parse = types.ModuleType("gpu_router.configparse_edited")
    parse.__package__ = "gpu_router"
    saved = sys.modules["gpu_router.config"]
    sys.modules["gpu_router.config"] = module  # configparse's `from .config import …` takes the edited copy
    try:
        exec(compile(PARSE_SOURCE, configparse.__file__, "exec"), parse.__dict__)
    finally:
        sys.modules["gpu_router.config"] = saved
    module.validate = parse.validate
    return module


def test_a_key_added_to_the_schema_reaches_every_record():
    edits = [("ROUTER", '    "new_router_key": (_int(0, 9), 7),', '"lock_dir": (_abspath, "/run/gpu-router/locks"),',
              "router", 7),
             ("HOST", '    "new_host_key": (_int(0, 9), 7),', '"other_ram_mb": (mib(0), 3072),', "host", 7),
             ("GPU", '    "new_gpu_key": (_int(0, 9), 7),', '"reserve_mb": (mib(0), 0),', "gpu", 7),
             ("AGENT", '    "new_agent_key": (_int(0, 9), 7),', '"group": (_string, "gpu-router"),', "agent", 7)]
    for _schema, line, after, section, default in edits:
        c = _config_with(line, after)
        key = line.split('"')[1]
        plain = c.validate({section: {key: 3}, "workloads": {"w": {"binary": "/bin/w", "threshold": 1}}}, "x", [])
        assert getattr(getattr(c.build(plain), section), key) == 3
        plain = c.validate({}, "x", [])
        assert getattr(getattr(c.build(plain), section), key) == default
    c = _config_with('    "new_workload_key": (_int(0, 9), 7),', '"cpu_args": (_strlist, []),')
    plain = c.validate({"workloads": {"w": {"binary": "/bin/w", "threshold": 1, "new_workload_key": 4}}}, "x", [])
    assert c.build(plain).workload("w").new_workload_key == 4
    assert c.build(c.validate({"workloads": {"w": {"binary": "/bin/w", "threshold": 1}}}, "x", [])) \
        .workload("w").new_workload_key == 7


def test_every_slot_is_a_schema_key_or_derived_and_every_key_a_slot():
    for record, schema, derived in ((config.Router, config.ROUTER, ()), (config.Host, config.HOST, ()),
                                    (config.Gpu, config.GPU, ()), (config.Agent, config.AGENT, ()),
                                    (config.Workload, config.WORKLOAD, ("name", "source", "vram_calibration"))):
        assert sorted(record.__slots__) == sorted(set(schema) | set(derived)), record.__name__
    # a validated profile fills every field of its record, and the cache's plain dict rebuilds the same record
    plain = config.validate({"workloads": {"w": {"binary": "/bin/w", "threshold": 1}}}, "x", [])
    assert sorted(plain["workloads"]["w"]) == sorted(config.Workload.__slots__)
