"""The man pages hold every config key and every command-line option (issue 20: `check -f` and `--directory` were
missing from gpu-router(1)). The keys come from the schema (agent/config.py), the options from the argparse
parsers themselves, walked: a key or option added without its documentation fails here."""

import argparse
import pathlib
import re

import pytest

from gpu_router import config
from gpu_router.ops import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
MAN = REPO / "packaging/man"


def text(page):
    """The page's roff as plain words: escapes undone, font changes dropped."""
    t = (MAN / page).read_text()
    t = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", t)
    return t.replace("\\-", "-").replace("\\(dq", '"').replace("\\&", "").replace("\\ ", " ")


def sections(page, macro=".SH"):
    """{heading: its lines} for the page's .SH (or .SS) sections."""
    out, name = {}, None
    for line in text(page).splitlines():
        if line.startswith(macro + " "):
            name = line[len(macro) + 1:].strip().strip('"')
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def mentions(lines, option):
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", "\n".join(lines)) is not None


def options(parser):
    """Every option string a user can type, but --help and hidden ones."""
    return sorted(o for a in parser._actions for o in a.option_strings
                  if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction))


def subcommands():
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def command_items(page="gpu-router.1"):
    """{command: the lines of its item under COMMANDS}: an item starts at `.TP` + `.B <command> ...`."""
    names = set(subcommands())
    lines = sections(page)["COMMANDS"]
    out, name = {}, None
    for prev, line in zip([""] + lines, lines):
        words = line.split()
        if prev.startswith(".TP") and line.startswith(".B ") and len(words) > 1 and words[1] in names:
            name = words[1]
            out.setdefault(name, [])
        if name is not None:
            out[name].append(line)
    return out


def test_every_command_has_an_item_in_gpu_router_1():
    assert sorted(command_items()) == sorted(subcommands())


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_of_every_command_is_in_gpu_router_1(name):
    """Each option is in its command's item, or in OPTIONS (the ones every command has: --json, --config)."""
    common = sections("gpu-router.1")["OPTIONS"]
    item = command_items()[name]
    missing = [o for o in options(subcommands()[name]) if not mentions(item, o) and not mentions(common, o)]
    assert not missing, f"gpu-router(1) does not document {name} {missing}"


def test_the_global_options_are_in_gpu_router_1():
    common = sections("gpu-router.1")["OPTIONS"]
    assert [o for o in options(cli.parser()) if not mentions(common, o)] == []


def agent_parser():
    """The parser gpu-router-agent builds, caught as it parses (the launcher's own entry point)."""
    launcher = (REPO / "packaging/bin/gpu-router-agent").read_text()
    module, func = re.search(r"^from (\S+) import (\w+)$", launcher, re.M).groups()
    entry = getattr(__import__(module, fromlist=[func]), func)

    class Caught(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        raise Caught(self)

    argparse.ArgumentParser.parse_args = catch
    try:
        entry([])
    except Caught as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError("gpu-router-agent built no argparse parser")


def test_every_option_of_the_agent_is_in_gpu_router_agent_8():
    found = options(agent_parser())
    assert "--once" in found
    lines = sections("gpu-router-agent.8")["OPTIONS"]
    assert [o for o in found if not mentions(lines, o)] == []


SECTIONS = (("[router]", config.ROUTER), ("[host]", config.HOST), ("[gpu]", config.GPU), ("[agent]", config.AGENT),
            ("[workloads.NAME]", config.WORKLOAD))


def documented_keys(lines):
    """The keys an item documents: the bold words of the line after each `.TP`."""
    keys = set()
    for prev, line in zip([""] + lines, lines):
        if prev.startswith(".TP") and line.startswith((".B ", ".BR ", ".BI ")):
            keys.update(w for w in re.findall(r'"[^"]*"|\S+', line.split(None, 1)[1])[0::2]
                        if re.fullmatch(r"[a-z_]+", w))
    return keys


@pytest.mark.parametrize("section,schema", SECTIONS, ids=[s for s, _ in SECTIONS])
def test_every_config_key_has_its_item_in_gpu_router_toml_5(section, schema):
    lines = sections("gpu-router.toml.5")[section]
    assert documented_keys(lines) == set(schema)
