"""What the documents name exists (issue 20: docs that stay true by test). From README.md, HACKING.md, docs/,
debian/README.Debian, bench/README.md, the man pages, the units' comments and the shipped Prometheus rules, this
extracts every command line (`gpu-router SUB --opt VALUE`, `gpu-router run --workload`, `gpu-router-agent --opt`,
in code blocks, inline code and the man pages' synopses) and option named alone, every metric name and label
claim, every config key and value (TOML blocks, `[section] key`, inline `key = value`), every journal field and
event, the exit codes, the bench scripts' options and the repository's paths; each is checked against the code
itself: the argparse parsers walked (their choices too), an exposition the real exporter writes
(daemon/metrics.py, seeded, fed one GPU and a backend error), the schema's own checkers (config.py), the
wrapper's exit constants, journal.MESSAGE_IDS. Grep level, said where it is: journal fields (a string or keyword
in agent/), `gpu-router run`'s options (main_run parses by hand), bench scripts' options (literals of the script).

Each document must yield a minimum of items, so an extraction that finds nothing cannot pass; a synthetic
document at the end goes through the same checkers and each of its errors must be reported."""

import argparse
import functools
import inspect
import pathlib
import re
import shlex
import tempfile
import tomllib

import pytest

from gpu_router import config
from gpu_router.ops import cli
from gpu_router.wrapper import run as wrapper_run
from test_manpages import agent_parser

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = ["README.md", "HACKING.md", "docs/fleet.md", "docs/runners.md", "debian/README.Debian", "bench/README.md",
        "packaging/man/gpu-router.1", "packaging/man/gpu-router.toml.5", "packaging/man/gpu-router-agent.8",
        "packaging/prometheus/gpu-router.rules.yml"] + sorted(
            str(p.relative_to(REPO)) for p in (REPO / "units").iterdir())

# What each document yields at least today (commands, options, metrics, keys, fields; see minimum()): far enough
# below the real counts that an edit does not trip it, far above 0.
MINIMUM = {"README.md": 150, "HACKING.md": 60, "docs/fleet.md": 80, "docs/runners.md": 25,
           "debian/README.Debian": 1, "bench/README.md": 20, "packaging/man/gpu-router.1": 150,
           "packaging/man/gpu-router.toml.5": 10, "packaging/man/gpu-router-agent.8": 40,
           "packaging/prometheus/gpu-router.rules.yml": 15, "units/gpu-router-agent.service": 2}


# ------------------------------------------------------------------------------------------------ the documents

def roff(text):
    """A man page as plain text: escapes undone, font changes dropped (macros kept at line starts)."""
    text = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", text)
    for a, b in (("\\-", "-"), ("\\(dq", '"'), ("\\(en", "-"), ("\\(mu", "x"), ("\\&", ""), ("\\ ", " "),
                 ("\\(aq", "'"), ("\\e", "\\")):
        text = text.replace(a, b)
    return text


def unroff_line(line):
    """`.BR a " b"` → `a b`: the words of a font macro line, quotes removed."""
    macro, _, rest = line.partition(" ")
    words = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', rest)]
    if macro in (".B", ".I"):
        return " ".join(words)
    if macro in (".BR", ".BI", ".IR", ".RB", ".RI", ".IB"):
        return "".join(words)  # alternating fonts: the pieces touch
    return line


class Doc:
    """One document's spans, (kind, line, text): "code" per line of a code block (or an Exec= of a unit, an .EX
    line of a man page), "toml" per line of a TOML block, "inline" per `inline code` (or an OPTIONS item of a
    man page), "synopsis" per command item of gpu-router(1) and option item of gpu-router-agent(8), "field" per
    field of gpu-router(1)'s JOURNAL items; its text (roff undone) for names found anywhere, and its prose (the
    text outside code blocks)."""

    def __init__(self, name, text=None):
        self.name = name
        self.text = (REPO / name).read_text() if text is None else text
        self.spans = []
        self.prose = self.text  # the text outside code blocks
        if name.startswith("packaging/man/"):
            self._man()
        elif name.startswith("units/"):
            self._unit()
        else:
            self._markdown()

    def _markdown(self):
        lines, lang, masked = self.text.split("\n"), None, []
        for n, line in enumerate(lines, 1):
            fence = re.match(r"\s*```(\w*)", line)
            if fence:
                lang = None if lang is not None else (fence.group(1) or "text")
                masked.append("")
                continue
            if lang is None:
                masked.append(line)
                continue
            masked.append("")
            self.spans.append(("toml" if lang == "toml" else "code", n, line))
        prose = self.prose = "\n".join(masked)
        for m in re.finditer(r"`([^`]+)`", prose):
            self.spans.append(("inline", prose.count("\n", 0, m.start()) + 1, m.group(1)))

    def _unit(self):
        for n, line in enumerate(self.text.split("\n"), 1):
            if line.startswith(("#", ";")):
                for m in re.finditer(r"`([^`]+)`", line):
                    self.spans.append(("inline", n, m.group(1)))
            elif line.startswith("Exec"):
                self.spans.append(("code", n, line.split("=", 1)[1].lstrip("-+@!:")))

    def _man(self):
        lines = roff(self.text).split("\n")
        self.text = self.prose = "\n".join(lines)
        example, item, heading = False, None, None
        subs = set(subcommands())
        for n, line in enumerate(lines, 1):
            prev = lines[n - 2] if n > 1 else ""
            if line.startswith(".SH"):
                item, heading = None, line[4:].strip()
            if line.startswith(".EX"):
                example = True
            elif line.startswith(".EE"):
                example = False
            elif example:
                self.spans.append(("toml" if self.name.endswith(".toml.5") else "code", n, line))
            elif self.name.endswith("gpu-router.1") and prev.startswith(".TP") and line.startswith(".B"):
                # an item of COMMANDS starts with its synopsis (`.B check [-f FILE]`); the items under it are
                # its options (`.BI --gpu " N"`)
                words = unroff_line(line).split()
                if words and words[0] in subs:
                    item = words[0]
                    self.spans.append(("synopsis", n, "gpu-router " + unroff_line(line)))
                elif words and words[0].startswith("-") and item:
                    self.spans.append(("synopsis", n, f"gpu-router {item} " + unroff_line(line)))
                elif words and words[0].startswith("-"):  # OPTIONS: --json, --workload, -w NAME
                    self.spans.append(("inline", n, unroff_line(line).replace(", ", "/")))
                elif heading == "JOURNAL":  # .BR WORKLOAD ", " INPUT: fields named without GPU_ROUTER_
                    self.spans += [("field", n, w) for w in re.findall(r"\b[A-Z][A-Z0-9_]+\b", unroff_line(line))]
            elif self.name.endswith("gpu-router-agent.8") and prev.startswith(".TP") and line.startswith(".B"):
                words = unroff_line(line).split()
                if words and words[0].startswith("-"):
                    self.spans.append(("synopsis", n, "gpu-router-agent " + unroff_line(line)))

    def where(self, line):
        return f"{self.name}:{line}"


@functools.lru_cache(maxsize=None)
def doc(name):
    return Doc(name)


def line_of(d, offset):
    return d.text.count("\n", 0, offset) + 1


# ------------------------------------------------------------------------------------------------ command lines

@functools.lru_cache(maxsize=None)
def ops_parser():
    return cli.parser()


def subcommands():
    sub = next(a for a in ops_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@functools.lru_cache(maxsize=None)
def run_options():
    """`gpu-router run` parses by hand (argparse is too slow for the hot path): its option literals, read from
    main_run's own source."""
    return frozenset(re.findall(r'"(--?[a-z][a-z-]*)', inspect.getsource(wrapper_run.main_run)))


STOP = re.compile(r"\s#|\|\||&&|[|;<>)`]|\$\(")
PROGRAM = re.compile(r"(?<![\w.-])(gpu-router(?:-agent)?)(?=\s|$)")


def command_lines(span_kind, text):
    """(program, tokens) for each gpu-router or gpu-router-agent command in a span; tokens end where the shell
    command does (a comment, a pipe, a redirection, `)`)."""
    if span_kind == "code":
        text = re.split(r"(?:^|\s)#", text, 1)[0]  # a comment is prose
    for m in PROGRAM.finditer(text):
        rest = text[m.end():]
        if span_kind == "synopsis":
            rest = re.sub(r"[][|{}]", " ", rest)  # [--opt VALUE], a|b
        else:
            stop = STOP.search(rest)
            rest = rest[:stop.start()] if stop else rest
        try:
            tokens = shlex.split(rest)
        except ValueError:
            tokens = rest.split()
        yield m.group(1), [t for t in tokens if t not in ("…", "...")]


def placeholder(token):
    """NAME, <id>, FILE..., 'question flags': a word standing for what the reader types."""
    return not re.fullmatch(r"[a-z][a-z0-9-]*", token)


def check_options(parser_actions, tokens, what):
    """Problems with the options among tokens (stop at `--`): unknown ones, named exactly (no abbreviations)."""
    problems, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        i += 1
        if t == "--":
            break
        if not t.startswith("-") or t == "-" or re.fullmatch(r"-\d.*", t):
            continue
        opt, eq, value = t.partition("=")
        action = parser_actions.get(opt)
        if action is None:
            problems.append(f"{what}: unknown option {opt}")
            continue
        if not eq and action.nargs != 0:
            if action.nargs in (None, 1) or (action.nargs == "?" and i < len(tokens)
                                              and not tokens[i].startswith("-")):
                value = tokens[i] if i < len(tokens) else ""
                i += 1
        if action.choices and value and not placeholder(value) and value not in action.choices:
            problems.append(f"{what}: {opt} takes {'|'.join(map(str, action.choices))}, not {value}")
    return problems


def check_command(program, tokens):
    """What is wrong with one documented command line, in words; [] when the parsers know all of it."""
    if program == "gpu-router-agent":
        return check_options(agent_parser()._option_string_actions, tokens, "gpu-router-agent")
    top = ops_parser()._option_string_actions
    i = 0
    while i < len(tokens) and tokens[i].startswith("-"):  # gpu-router --config FILE check
        problems = check_options(top, tokens[i:i + 2], "gpu-router")
        if problems:
            return problems
        i += 1 if tokens[i] in ("--version", "-h", "--help") or "=" in tokens[i] else 2
    if i >= len(tokens) or placeholder(tokens[i]):
        return []
    name, rest = tokens[i], tokens[i + 1:]
    if name == "run":
        fake = {o: argparse.Action([o], "x", nargs=None if o in ("--config", "--workload", "-w") else 0)
                for o in run_options()}
        return check_options(fake, rest, "gpu-router run")
    if name not in subcommands():
        return [f"gpu-router: unknown command {name}"]
    return check_options(subcommands()[name]._option_string_actions, rest, f"gpu-router {name}")


# Options of other programs that the documents name in inline code, bare: (program, option).
FOREIGN_OPTIONS = {"--no-requeue": "sbatch", "--open-mode": "sbatch", "--mem": "sbatch",
                   "--query-accounted-apps": "nvidia-smi", "--query-compute-apps": "nvidia-smi"}


@functools.lru_cache(maxsize=None)
def every_option():
    """Each option string of gpu-router (every command), gpu-router run and gpu-router-agent; and the option
    literals of agent/ and bench/ sources (an option the code prints, a bench script's)."""
    found = set(ops_parser()._option_string_actions) | set(agent_parser()._option_string_actions) | run_options()
    for p in subcommands().values():
        found |= set(p._option_string_actions)
    for src in sorted((REPO / "agent").rglob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        found |= set(re.findall(r'"(--[a-z][a-z0-9-]*)"', src.read_text()))
    return found


def bare_options(d):
    """(line, option) for inline code that starts with an option (`--as PATH`, `-o/--output {table,json}`)."""
    for kind, n, text in d.spans:
        if kind == "inline" and re.match(r"--?[a-z]", text):
            for opt in text.split()[0].split("/"):
                yield n, opt.split("=")[0]


def bare_option_problems(d):
    return [f"{d.where(n)}: `{opt}` is an option of no command (nor of {sorted(set(FOREIGN_OPTIONS.values()))})"
            for n, opt in bare_options(d) if opt not in every_option() and opt not in FOREIGN_OPTIONS]


BENCH = re.compile(r"(?<![\w/.-])(bench/[\w-]+\.py)\b([^#|;&>`\n]*)")


def bench_commands(d):
    """(line, script, options) for each bench script run in a code line: `bench/trace.py --traces foreign`."""
    for kind, n, text in d.spans:
        if kind in ("code", "inline"):
            for m in BENCH.finditer(re.split(r"(?:^|\s)#", text, 1)[0]):
                yield n, m.group(1), [t.split("=")[0] for t in re.sub(r"[][]", " ", m.group(2)).split()
                                      if t.startswith("--")]


def bench_problems(d):
    """Grep level: a bench script's option is a literal of that script (they are run, not imported, here)."""
    out = []
    for n, script, opts in bench_commands(d):
        path = REPO / script
        src = path.read_text() if path.exists() else ""
        out += [f"{d.where(n)}: {script} has no option {o}" for o in opts if f'"{o}"' not in src]
    return out


def commands(d):
    """(line, program, tokens) for every command line of the document."""
    for kind, n, text in d.spans:
        if kind in ("code", "inline", "synopsis"):
            for program, tokens in command_lines(kind, text):
                yield n, program, tokens


def command_problems(d):
    out = []
    for n, program, tokens in commands(d):
        out += [f"{d.where(n)}: `{program} {' '.join(tokens)}`: {p}" for p in check_command(program, tokens)]
    return out


# ------------------------------------------------------------------------------------------------ metrics

@functools.lru_cache(maxsize=None)
def exposition():
    """{family: (type, {label: {values seen}})} and the sample names, from the real exporter: a config with one
    workload, seeded (every known series at 0), one healthy GPU, then a backend error (its own family)."""
    from prometheus_client.parser import text_string_to_metric_families

    from gpu_router.daemon import metrics
    from helpers import gpu_entry

    with tempfile.TemporaryDirectory() as d:
        (pathlib.Path(d) / "config.toml").write_text(
            f'[router]\nlock_dir = "{d}/locks"\n[gpu]\nsnapshot = "{d}/gpus.json"\n[agent]\nstate_dir = "{d}/s"\n'
            '[workloads.w]\nbinary = "/bin/true"\nthreshold = 10\nmax_gpu_jobs = 1\n')
        cfg = config.load(f"{d}/config.toml", use_cache=False)
        texts = []
        for state, snap in (("a", {"time": 1.0, "source": "nvml", "error": None,
                                    "gpus": [dict(gpu_entry(0), utilization=50)]}),
                            ("b", {"time": 1.0, "source": "nvml", "error": "init-failed: x", "gpus": []})):
            m = metrics.Metrics(f"{d}/{state}")
            m.update(cfg, snap, [])
            m.seed(cfg)
            m.update(cfg, snap, [])
            texts.append(m.text())
    families, samples = {}, set()
    for text in texts:
        for fam in text_string_to_metric_families(text):
            labels = families.setdefault(fam.name, (fam.type, {}))[1]
            if fam.type == "counter":
                samples.update({fam.name + "_total", fam.name + "_created"})
            elif fam.type == "histogram":
                samples.update(fam.name + suffix for suffix in ("", "_bucket", "_sum", "_count", "_created"))
            else:
                samples.add(fam.name)
            for sample in fam.samples:
                for k, v in sample.labels.items():
                    if k != "le":
                        labels.setdefault(k, set()).add(v)
    for name, (_, names) in metrics.COUNTERS.items():  # a counter with no series yet still has its labels
        for k in names:
            families[name[:-len("_total")]][1].setdefault(k, set())
    return families, samples


# Labels whose values form a closed set the code produces (the others are workloads, GPUs, versions, ...).
CLOSED = ("mode", "reason", "result", "outcome", "pool", "kind")


def family_of(name):
    families, _ = exposition()
    for suffix in ("_total", "_created", "_bucket", "_sum", "_count", ""):
        if name.endswith(suffix) and name[:len(name) - len(suffix)] in families:
            return name[:len(name) - len(suffix)]
    return None


METRIC = re.compile(r"(?<![\w.])(gpu_router_[a-z0-9_]*[a-z0-9])(?![\w])(\s*\{[^}\n]*\})?")


def check_labels(name, claim):
    """Problems with `{label="value", ...}` or a bare `{label, label}` list after a metric name."""
    families, _ = exposition()
    fam = family_of(name)
    labels = families[fam][1]
    problems = []
    for item in re.split(r",\s*", claim.strip().strip("{}").strip()):
        if not item:
            continue
        m = re.fullmatch(r'(\w+)\s*(=~|!~|!=|=)?\s*(?:"([^"]*)")?', item.strip())
        if not m:
            continue
        label, op, value = m.groups()
        if label not in labels and label not in ("instance", "job", "le"):
            problems.append(f"{name} has no label {label} (it has {sorted(labels)})")
        elif label in CLOSED and op in ("=", "=~") and value is not None:
            for v in value.split("|") if op == "=~" else [value]:
                if re.fullmatch(r"[\w:-]+", v) and v not in labels[label]:
                    problems.append(f'{name}{{{label}="{v}"}}: the code never exports {label}="{v}" '
                                    f"(it does {sorted(labels[label])})")
    return problems


def metric_mentions(d):
    for m in METRIC.finditer(d.text):
        yield line_of(d, m.start()), m.group(1), m.group(2)


def metric_problems(d):
    _, samples = exposition()
    out = []
    for n, name, claim in metric_mentions(d):
        if name not in samples and family_of(name) is None:
            out.append(f"{d.where(n)}: {name} is not exported by daemon/metrics.py")
        elif claim:
            out += [f"{d.where(n)}: {p}" for p in check_labels(name, claim)]
    return out


# ------------------------------------------------------------------------------------------------ config keys

SCHEMA = {"router": config.ROUTER, "host": config.HOST, "gpu": config.GPU, "agent": config.AGENT,
          "workloads.*": config.WORKLOAD}
# `[gpu] accounting`; a line break between them only inside inline code (`[gpu]\nreserve_mb`)
SECTION_KEY = re.compile(r"\[(router|host|gpu|agent|workloads\.[\w.-]+)\](?:[ \t]+|\n(?=[a-z_]+`))([a-z_]+)\b(?!\])")
TOML_VALUE = r'(?:"[^"]*"|\[|\d|-\d|true\b|false\b|\{)'


def schema_for(section):
    return SCHEMA.get("workloads.*" if section.startswith("workloads.") else section)


def _settings(d):
    """(line, section, key, text) of each table head (key None) and each one-line `key = value` of the document's
    TOML blocks (under their table), and of each inline `key = value` (section None)."""
    section = None
    for kind, n, text in d.spans:
        if kind == "toml":
            head = re.match(r"\s*\[([\w.-]+)\]", text)
            if head:
                section = head.group(1)
                yield n, section, None, text
                continue
            m = re.match(rf"\s*([A-Za-z_][\w-]*)\s*=\s*{TOML_VALUE}", text)
            if m:
                yield n, section, m.group(1), text.strip()
        elif kind == "inline":
            m = re.fullmatch(rf"([a-z_]+) = {TOML_VALUE}.*", text, re.S)
            if m:
                yield n, None, m.group(1), text


def config_keys(d):
    """(line, section or None, key) for each key the document writes: the keys of its TOML blocks (under their
    table), `[section] key` anywhere, and `key = value` in inline code (any section)."""
    for n, section, key, _ in _settings(d):
        yield (n, "table", section) if key is None else (n, section, key)
    for m in SECTION_KEY.finditer(d.prose):
        if m.group(2) not in ("table", "tables", "and", "or"):
            yield d.prose.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)


def check_key(section, key):
    if section == "table":
        return [] if schema_for(key) is not None else [f"[{key}] is no section of the config"]
    if section is None:
        return [] if any(key in s for s in SCHEMA.values()) else [f"{key} is no config key"]
    schema = schema_for(section)
    if schema is None:
        return [f"[{section}] is no section of the config"]
    return [] if key in schema else [f"[{section}] has no key {key}"]


def config_values(d):
    """(line, section or None, `key = value` text) for each one-line setting of a TOML block or inline code."""
    for n, section, key, text in _settings(d):
        if key is not None and re.fullmatch(r"[a-z_]+", key):
            yield n, section, text


def check_value(section, setting):
    """The value through the schema's own checker for its key (in any section that has it when none is named)."""
    try:
        (key, value), = tomllib.loads(setting).items()
    except (tomllib.TOMLDecodeError, ValueError):
        return [f"{setting!r} is no TOML setting"]
    schemas = [schema_for(section)] if section else [s for s in SCHEMA.values() if key in s]
    errors = []
    for schema in schemas:
        if schema is None or key not in schema:
            return []  # check_key says so
        try:
            schema[key][0](value)
            return []
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    return [f"{setting}: {errors[0]}"] if errors else []


def key_problems(d):
    return ([f"{d.where(n)}: {p}" for n, section, key in config_keys(d) for p in check_key(section, key)]
            + [f"{d.where(n)}: {p}" for n, section, setting in config_values(d) for p in check_value(section, setting)])


# ------------------------------------------------------------------------------------------------ journal fields

@functools.lru_cache(maxsize=None)
def agent_sources():
    return "\n".join(p.read_text() for p in sorted((REPO / "agent").rglob("*.py")))


FIELD = re.compile(r"(?<![\w$])GPU_ROUTER_([A-Z][A-Z0-9_]*[A-Z0-9])(?:=([A-Za-z][\w:-]*))?")


def journal_fields(d):
    """(line, field without GPU_ROUTER_, value or None): every GPU_ROUTER_X(=value) anywhere, and the bare names of
    README's Journal fields section (`MODE`, `RESULT`, ...)."""
    for m in FIELD.finditer(d.text):
        yield line_of(d, m.start()), m.group(1), m.group(2)
    for kind, n, text in d.spans:
        if kind == "field":
            yield n, text, None
    section = re.search(r"^## Journal fields\n(.*?)^## ", d.text, re.S | re.M)
    if section:
        for m in re.finditer(r"`([A-Z][A-Z0-9_]+)`", section.group(1)):
            yield line_of(d, section.start(1) + m.start()), m.group(1), None


# Fields whose values are the code's own words (a workload's or a job's value is the reader's).
CLOSED_FIELDS = ("EVENT", "MODE", "RESULT", "REASON", "OOM_CAUSE", "OOM_MEMORY", "PEAK_VRAM_SOURCE")


def check_field(field, value):
    """Grep level: the field is a string, a dict key or a keyword argument somewhere in agent/, and so is a
    value claimed for it (`GPU_ROUTER_EVENT=routed`: "routed")."""
    src = agent_sources()
    if not re.search(rf'["\']{field}["\']|\b{field}=|GPU_ROUTER_{field}\b', src):
        return [f"GPU_ROUTER_{field} is written nowhere in agent/"]
    if value and field in CLOSED_FIELDS and not re.search(rf'["\']{re.escape(value)}["\']', src):
        return [f"GPU_ROUTER_{field}={value}: no {value!r} in agent/"]
    return []


def field_problems(d):
    return [f"{d.where(n)}: {p}" for n, f, v in journal_fields(d) for p in check_field(f, v)]


# ------------------------------------------------------------------------------------------------ exit codes

def code_exit_codes():
    """The exit codes the code defines: the wrapper's EX_* constants, the config's *_exit_code defaults, and
    126/127 (the exec failure, as the wrapper returns them)."""
    codes = {v for k, v in vars(wrapper_run).items() if k.startswith("EX_") and isinstance(v, int)}
    codes |= {default for key, (_, default) in config.ROUTER.items() if key.endswith("_exit_code")}
    if "127 if isinstance(exc, FileNotFoundError) else 126" in inspect.getsource(wrapper_run):
        codes |= {126, 127}
    return codes


def readme_exit_codes(d):
    section = re.search(r"^## Exit codes\n(.*?)^## ", d.text, re.S | re.M).group(1)
    rows = re.findall(r"^\| ([^|]+) \|", section, re.M)
    return {int(c) for row in rows for c in re.findall(r"^\d+|(?<=/ )\d+", row.strip())}


# ------------------------------------------------------------------------------------------------ paths

REPO_PATH = re.compile(r"(?<![\w./-])((?:tests|bench|agent|packaging|debian|units|docs)/[\w./*-]*[\w*])")


def repo_paths(d):
    """(line, path) for each path into this repository the document names (`tests/test_runners.py`)."""
    for m in REPO_PATH.finditer(d.text):
        yield line_of(d, m.start()), m.group(1)


def path_problems(d):
    return [f"{d.where(n)}: {p} is no file of the repository" for n, p in repo_paths(d)
            if not (any(REPO.glob(p)) if "*" in p else (REPO / p).exists())]


# ------------------------------------------------------------------------------------------------ the tests

def minimum(d):
    """Items extracted: each command line and its words, bare options, metrics, config keys, journal fields."""
    return (sum(1 + len(t) for _, _, t in commands(d)) + sum(1 for _ in bare_options(d))
            + sum(1 for _ in metric_mentions(d)) + sum(1 for _ in config_keys(d)) + sum(1 for _ in journal_fields(d))
            + sum(1 for _ in repo_paths(d)) + sum(1 + len(o) for _, _, o in bench_commands(d)))


def test_every_document_is_read():
    assert set(MINIMUM) <= set(DOCS), "a document named in MINIMUM is gone"
    assert set(DOCS) - set(MINIMUM) <= {str(p.relative_to(REPO)) for p in (REPO / "units").iterdir()}


@pytest.mark.parametrize("name", DOCS)
def test_the_extraction_finds_what_the_document_names(name):
    """So that an extraction broken by a format change cannot pass on nothing."""
    assert minimum(doc(name)) >= MINIMUM.get(name, 0)


# What each check holds a document to; every check runs on every document (an empty one finds nothing to fault).
CHECKS = {
    "command lines name real commands and options": command_problems,
    "options named alone in inline code exist": bare_option_problems,
    "bench scripts' options exist": bench_problems,
    "repository paths named exist": path_problems,
    "metrics named are exported with the labels claimed": metric_problems,
    "config keys written are in the schema": key_problems,
    "journal fields named are written by the code": field_problems,
}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("name", DOCS)
def test_what_the_document_names_exists(name, check):
    problems = CHECKS[check](doc(name))
    assert not problems, "\n".join(problems)

def table_rows(d, heading):
    section = re.search(rf"^## {heading}\n(.*?)^## ", d.text, re.S | re.M).group(1)
    return re.findall(r"^\| `(gpu_router_\w+)` \| ([^|]+?) \|\s*([^|]*?)\s*\|", section, re.M)


def split_labels(cell):
    """`workload, mode (GPU, CPU), reason` → {label: [values]}."""
    out = {}
    for m in re.finditer(r"(\w+)(?: \(([^)]*)\))?", cell):
        out[m.group(1)] = [v.strip() for v in (m.group(2) or "").split(",") if v.strip()]
    return out


def test_readme_lists_every_exported_metric_with_its_type_and_labels():
    families, _ = exposition()
    rows = table_rows(doc("README.md"), "Metrics")
    assert len(rows) >= 25
    listed = {family_of(name): (name, kind, labels) for name, kind, labels in rows}
    assert set(listed) == set(families)
    problems = []
    for fam, (name, kind, cell) in listed.items():
        real_kind, real_labels = families[fam]
        if kind.split()[0] != real_kind:
            problems.append(f"{name}: README says {kind.strip()}, the exporter {real_kind}")
        claimed = split_labels(cell)
        if set(claimed) != set(real_labels):
            problems.append(f"{name}: README's labels {sorted(claimed)}, the exporter's {sorted(real_labels)}")
        for label, values in claimed.items():
            if label in CLOSED:
                problems += check_labels(name, ", ".join(f'{label}="{v}"' for v in values))
    assert problems == []


def test_gpu_router_agent_8_lists_every_exported_metric_with_its_labels():
    families, _ = exposition()
    d = doc("packaging/man/gpu-router-agent.8")
    listed = {}
    for line in d.text.split("\n"):
        m = re.match(r"\.BR? (gpu_router_\w+)(?: \" \{([^}]*)\}\")?$", line)
        if m:
            listed[family_of(m.group(1))] = (m.group(1), set(re.findall(r"\w+", m.group(2) or "")))
    assert set(listed) == set(families)
    assert [f"{name}: {labels} != {sorted(families[fam][1])}" for fam, (name, labels) in listed.items()
            if labels != set(families[fam][1])] == []


def test_hacking_module_map_names_every_module_and_only_those():
    """The module map is how a change finds its room: each row's file exists, each file has its row."""
    rows = re.findall(r"^\| ([^|]+) \|", doc("HACKING.md").text, re.M)
    named = {name for row in rows for name in re.findall(r"`([\w/]+\.py)`", row)}
    files = {str(p.relative_to(REPO / "agent")) for p in (REPO / "agent").rglob("*.py") if p.name != "__init__.py"}
    assert len(named) >= 40
    assert sorted(named - files) == [], "HACKING.md names modules that do not exist"
    assert sorted(files - named) == [], "modules without their row in HACKING.md's module map"


def test_readme_journal_events_are_the_events_the_code_has():
    """README's list after `GPU_ROUTER_EVENT` (routed, blocked, ..., vram-foreign with `PID`, ...)."""
    from gpu_router import journal

    d = doc("README.md")
    section = re.search(r"^## Journal fields\s*`GPU_ROUTER_EVENT` \((.*?)\), `MODE`", d.text, re.S | re.M).group(1)
    listed = {re.match(r"\s*([a-z-]+)", item).group(1) for item in re.split(r",\s*(?=[a-z])", section)}
    assert listed == set(journal.MESSAGE_IDS)


def test_gpu_router_1_lists_every_event_with_its_message_id():
    from gpu_router import journal

    d = doc("packaging/man/gpu-router.1")
    table = re.search(r"^\.TS\n.*?\.\n(.*?)^\.TE", d.text[d.text.index(".SH JOURNAL"):], re.S | re.M).group(1)
    assert dict(line.split("\t") for line in table.strip().split("\n")) == journal.MESSAGE_IDS


def rule_problems(rules):
    """Each alert's labels (`by (...)`, `on (...)`, `{{ $labels.x }}` in its text) are labels of a metric its
    expression uses: an alert grouping by a label no series has fires without it, or never."""
    families, _ = exposition()
    problems, alerts = [], 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            alerts += 1
            expr = rule["expr"]
            used = {family_of(m.group(1)) for m in METRIC.finditer(expr)} - {None}
            have = {"instance", "job"}.union(*(families[f][1] for f in used))
            words = re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr)
            wanted = {w for group_labels in words for w in re.findall(r"\w+", group_labels)}
            wanted |= set(re.findall(r"\$labels\.(\w+)", str(rule.get("annotations", ""))))
            name = rule.get("alert") or rule.get("record")
            problems += [f"{name}: label {w} is on none of {sorted(used)}" for w in sorted(wanted - have)]
    return alerts, problems


def test_the_shipped_rules_use_labels_their_metrics_have():
    import yaml

    alerts, problems = rule_problems(yaml.safe_load((REPO / "packaging/prometheus/gpu-router.rules.yml").read_text()))
    assert alerts >= 5
    assert not problems, "\n".join(problems)


def test_the_rules_check_reports_a_label_no_metric_has():
    rules = {"groups": [{"rules": [
        {"alert": "A", "expr": "sum by (instance, workload) (increase(gpu_router_jobs_blocked_total[5m])) > 0",
         "annotations": {"summary": "{{ $labels.workload }} {{ $labels.mode }}"}},
        {"alert": "B", "expr": "gpu_router_slots_busy >= on (instance, pool, gpu) gpu_router_slots"}]}]}
    assert rule_problems(rules) == (2, [
        "A: label mode is on none of ['gpu_router_jobs_blocked']",
        "B: label gpu is on none of ['gpu_router_slots', 'gpu_router_slots_busy']"])


def test_readme_exit_codes_are_the_codes_the_wrapper_defines():
    documented = readme_exit_codes(doc("README.md"))
    assert len(documented) >= 7
    assert documented == code_exit_codes()


def test_gpu_router_1_exit_status_is_the_codes_the_wrapper_defines():
    d = doc("packaging/man/gpu-router.1")
    section = re.search(r"^\.SH EXIT STATUS\n(.*?)^\.SH ", d.text, re.S | re.M).group(1)
    assert set(map(int, re.findall(r"^\.B (\d+)$", section, re.M))) == code_exit_codes()


# ------------------------------------------------------------------------------------------------ the checker fails

WRONG = """# a synthetic document

```sh
gpu-router check --frobnicate           # an option check does not have
gpu-router explode now.mp3              # a command that does not exist
gpu-router status --watch 2 --json      # fine
gpu-router jobs -o yaml
gpu-router run --workload w --bogus -- x
gpu-router-agent --once --twice
```

Inline too: `gpu-router jobs --sinse=-1d`, `gpu-router drain --wait 600`, `--as PATH`, `--ass PATH`.

```toml
[gpu]
reserve_mb = 100
reserv_mb = 100
[workloads.x]
max_gpu_job = 2
max_cpu_jobs = -1
[gpus]
```

`[agent] metric_dir` and `on_gpu_oom = "cpu"` and `spill_cpu = true`, `on_gpu_oom = "gpu"`.

The metric gpu_router_gpu_memory_mib, gpu_router_jobs_routed_total{reason="drained"} (fine),
gpu_router_jobs_blocked_total{result="success"}, gpu_router_jobs_finished_total{result=~"oom-kill|oom"}.

`journalctl GPU_ROUTER_EVENT=routed GPU_ROUTER_MOOD=GPU GPU_ROUTER_EVENT=exploded`

Tested in tests/test_docs_true.py and tests/test_nothing.py; `bench/trace.py --traces grow --jobz 4`.
"""


def test_the_checker_reports_what_is_wrong_in_a_synthetic_document():
    d = Doc("synthetic.md", WRONG)
    found = (command_problems(d) + bare_option_problems(d) + path_problems(d) + bench_problems(d)
             + metric_problems(d)) + key_problems(d) + field_problems(d)
    expected = ["synthetic.md:4: `gpu-router check --frobnicate`: gpu-router check: unknown option --frobnicate",
                "synthetic.md:5: `gpu-router explode now.mp3`: gpu-router: unknown command explode",
                "synthetic.md:7: `gpu-router jobs -o yaml`: gpu-router jobs: -o takes table|json, not yaml",
                "synthetic.md:8: `gpu-router run --workload w --bogus -- x`: gpu-router run: unknown option --bogus",
                "synthetic.md:9: `gpu-router-agent --once --twice`: gpu-router-agent: unknown option --twice",
                "synthetic.md:12: `gpu-router jobs --sinse=-1d`: gpu-router jobs: unknown option --sinse",
                "synthetic.md:12: `--ass` is an option of no command (nor of ['nvidia-smi', 'sbatch'])",
                "synthetic.md:17: [gpu] has no key reserv_mb",
                "synthetic.md:19: [workloads.x] has no key max_gpu_job",
                "synthetic.md:20: max_cpu_jobs = -1: expected a whole number from 0 to 4096, got -1",
                "synthetic.md:21: [gpus] is no section of the config",
                "synthetic.md:24: spill_cpu is no config key",
                "synthetic.md:24: [agent] has no key metric_dir",
                "synthetic.md:24: on_gpu_oom = \"gpu\": expected one of 'cpu', 'gpu-with-room', 'fail', got 'gpu'",
                "synthetic.md:26: gpu_router_gpu_memory_mib is not exported by daemon/metrics.py",
                "synthetic.md:27: gpu_router_jobs_blocked_total has no label result (it has ['reason', 'workload'])",
                'synthetic.md:27: gpu_router_jobs_finished_total{result="oom"}: the code never exports result="oom" '
                "(it does ['cuda-oom', 'failed', 'gpu-fault', 'oom-kill', 'success', 'timeout', 'unknown'])",
                "synthetic.md:29: GPU_ROUTER_MOOD is written nowhere in agent/",
                "synthetic.md:29: GPU_ROUTER_EVENT=exploded: no 'exploded' in agent/",
                "synthetic.md:31: tests/test_nothing.py is no file of the repository",
                "synthetic.md:31: bench/trace.py has no option --jobz"]
    assert sorted(found) == sorted(expected)


def test_the_scripts_of_readmes_first_lines_start_outside_pytest():
    """README's first lines name scripts run by hand (`python3 tests/systemd/demo.py`), outside pytest, whose
    conftest puts gpu_router on sys.path: a module-level `from gpu_router …` in a lane module the demo imports
    (test_scopes.py did, for the pool's size) broke the first command with a ModuleNotFoundError. Each script is
    started with `--help` in an empty environment from another folder: its imports must all resolve."""
    import subprocess

    head = "\n".join(doc("README.md").text.splitlines()[:12])
    scripts = sorted(set(re.findall(r"python3 (\S+\.py)", head)))
    assert scripts, "README's first lines name no Python script"
    for script in scripts:
        r = subprocess.run(["/usr/bin/python3", str(REPO / script), "--help"], env={"PATH": "/usr/bin:/bin"},
                           cwd="/", capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, f"{script}: {r.stderr.strip()[-400:]}"
