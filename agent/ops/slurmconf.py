"""Reading a site's live slurm.conf / gres.conf and merging gpu-router's settings into them.

An administrator must be able to apply what `slurm-conf` prints as it is. Slurm stops on a second node line for a
host (``fatal: Duplicated NodeHostName``) and keeps only the last of a repeated key (a second
``SchedulerParameters`` drops the site's own), so gpu-router's figures are merged into the site's lines, never
added beside them. This module is the one reader of those files: entries with their file and line (Include lines
followed), the node lines that name a host (host lists expanded), merge of comma lists, and the merged texts.
"""

import glob
import os
import re

EXPLINES = {"nodename", "partitionname", "nodeset", "frontendname", "downnodes", "switchname"}
GR = re.compile(r"^gr_\w+_(gpu|cpu)$")


class SlurmConfError(Exception):
    """The live file cannot be read or merged; the message says which file and why."""


def conf_path():
    """Where Slurm's own commands read slurm.conf: $SLURM_CONF, else /etc/slurm/slurm.conf."""
    return os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"


class Entry:
    """One setting line: its file, line number, the raw text and its key=value pairs (keys as written)."""
    __slots__ = ("file", "lineno", "raw", "pairs")

    def __init__(self, file, lineno, raw, pairs):
        self.file, self.lineno, self.raw, self.pairs = file, lineno, raw, pairs

    @property
    def kind(self):
        return self.pairs[0][0].lower()

    def get(self, key):
        return next((v for k, v in self.pairs if k.lower() == key.lower()), None)

    def where(self):
        return f"{self.file}:{self.lineno}"


def split_pairs(text):
    """``Key=Value Key2="a b"`` → [(Key, Value), …]; a comment (#) ends the line."""
    pairs, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] == "#":
            break
        j = i
        while j < n and not text[j].isspace() and text[j] != "=":
            j += 1
        key = text[i:j]
        value = ""
        if j < n and text[j] == "=":
            j += 1
            if j < n and text[j] == '"':
                end = text.find('"', j + 1)
                end = n if end < 0 else end
                value, j = text[j + 1:end], end + 1
            else:
                k = j
                while k < n and not text[k].isspace() and text[k] != "#":
                    k += 1
                value, j = text[j:k], k
        pairs.append((key, value))
        i = j
    return pairs


def read(path=None, _seen=None):
    """Every setting line of slurm.conf and the files it includes, in Slurm's reading order."""
    path = path or conf_path()
    seen = _seen if _seen is not None else set()
    real = os.path.realpath(path)
    if real in seen:
        raise SlurmConfError(f"{path} includes itself")
    seen.add(real)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise SlurmConfError(f"cannot read {path}: {exc.strerror or exc}") from None
    entries = []
    for lineno, raw in enumerate(lines, 1):
        body = raw.split("#", 1)[0].strip()
        if not body:
            continue
        words = body.split(None, 1)
        if words[0].lower() == "include" and len(words) == 2:
            target = words[1].strip().strip('"')
            if not os.path.isabs(target):
                target = os.path.join(os.path.dirname(path), target)
            found = sorted(glob.glob(target)) if any(c in target for c in "*?[") else [target]
            for sub in found:
                entries += read(sub, seen)
            continue
        pairs = split_pairs(body)
        if pairs:
            entries.append(Entry(path, lineno, raw, pairs))
    return entries


def settings(entries, key):
    """The entries that set a top-level key (case-insensitive), wherever they are."""
    return [e for e in entries if e.kind not in EXPLINES and any(k.lower() == key.lower() for k, _ in e.pairs)]


def expand_hostlist(text):
    """Slurm's host list ``gpu[01-03,07],cpu1`` → [gpu01, gpu02, gpu03, gpu07, cpu1] (one bracket per name)."""
    names, depth, cur = [], 0, ""
    for ch in text + ",":
        if ch == "," and depth == 0:
            if cur:
                names.append(cur)
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    out = []
    for name in names:
        m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", name)
        if not m:
            out.append(name)
            continue
        head, ranges, tail = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi and lo.isdigit() and hi.isdigit():
                out += [f"{head}{i:0{len(lo)}d}{tail}" for i in range(int(lo), int(hi) + 1)]
            else:
                out.append(f"{head}{part}{tail}")
    return out


def node_lines(entries, node):
    """The NodeName lines (not DEFAULT) whose host list names `node` (or every host of a host-list `node`)."""
    wanted = set(expand_hostlist(node))
    return [e for e in entries if e.kind == "nodename" and e.pairs[0][1].upper() != "DEFAULT"
            and wanted & set(expand_hostlist(e.pairs[0][1]))]


def node_value(entries, line, key):
    """A node's key as Slurm sees it: its own line, else the last NodeName=DEFAULT line before it."""
    own = line.get(key)
    if own is not None:
        return own
    value = None
    for e in entries:
        if e is line:
            break
        if e.kind == "nodename" and e.pairs[0][1].upper() == "DEFAULT" and e.get(key) is not None:
            value = e.get(key)
    return value


def codes(text):
    """RequeueExit's list (``75,100-102``) as a set of ints; words Slurm would refuse are ignored."""
    out = set()
    for part in (text or "").split(","):
        lo, _, hi = part.strip().partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def merge_list(site, ours, same=lambda a, b: a == b):
    """A comma list: the site's items in their order, then ours the site lacks (``same`` says which match)."""
    items = [x for x in (site or "").split(",") if x]
    for item in ours:
        if not any(same(x, item) for x in items):
            items.append(item)
    return ",".join(items)


def option_name(item):
    return item.split("=", 1)[0].strip().lower()


def merged_settings(entries, wanted):
    """{key: merged value} for gpu-router's keys, given the site's entries ([] when no live file).

    GresTypes: a union; RequeueExit: the site's list plus missing codes; AuthInfo and SchedulerParameters: the
    site's options, plus ours where the site has no option of that name (the site's own choice wins)."""
    def site(key):
        found = settings(entries, key)
        return found[-1].get(key) if found else None

    out = {}
    out["GresTypes"] = merge_list(site("GresTypes"), wanted["GresTypes"].split(","))
    have = codes(site("RequeueExit"))
    missing = [c for c in codes(wanted["RequeueExit"]) if c not in have]
    out["RequeueExit"] = merge_list(site("RequeueExit"), [str(c) for c in sorted(missing)])
    for key in ("AuthInfo", "SchedulerParameters"):
        out[key] = merge_list(site(key), wanted[key].split(","), lambda a, b: option_name(a) == option_name(b))
    return out


def merge_gres(site, ours):
    """A node's Gres=: the site's own GRES kept, any gpu-router GRES (gr_*_gpu|cpu) replaced by ours."""
    kept = [x for x in (site or "").split(",") if x and not GR.match(x.split(":", 1)[0])]
    return ",".join(kept + ours)


def merged_node_line(entry, node, cpus, memory_mb, gres, entries):
    """The site's node line with gpu-router's Gres merged in and CPUs/RealMemory added where Slurm has none;
    a new line when the site has none (``entry`` None)."""
    if entry is None:
        return f"NodeName={node} CPUs={cpus} RealMemory={memory_mb} Gres={','.join(gres)} State=UNKNOWN"
    pairs = list(entry.pairs)
    if node_value(entries, entry, "CPUs") is None:
        pairs.append(("CPUs", str(cpus)))
    if node_value(entries, entry, "RealMemory") is None:
        pairs.append(("RealMemory", str(memory_mb)))
    index = next((i for i, (k, _) in enumerate(pairs) if k.lower() == "gres"), None)
    if index is None:
        pairs.append(("Gres", merge_gres(None, gres)))
    else:
        pairs[index] = (pairs[index][0], merge_gres(pairs[index][1], gres))
    return " ".join(f'{k}="{v}"' if " " in v else f"{k}={v}" for k, v in pairs)


def merged_conf(path, node, cpus, memory_mb, gres, wanted):
    """The live slurm.conf (main file) with everything merged in: the text to install as it is.

    A key or node line to change that lives in an included file cannot be merged into the main file without a
    second definition: SlurmConfError names that file."""
    entries = read(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if not any(e.file == path for e in entries):
        raise SlurmConfError(f"{path} has no settings (empty?): not merging into it. Write the merged text to "
                             f"another file first; `> {path}` empties the file before it is read")
    values = merged_settings(entries, wanted)
    replace, append = {}, []
    nodes = node_lines(entries, node)
    if len(nodes) > 1:
        raise SlurmConfError(f"{node} is named by {len(nodes)} NodeName lines ("
                             + ", ".join(e.where() for e in nodes) + "): Slurm refuses that; keep one")
    for e in nodes:
        if e.file != path:
            raise SlurmConfError(f"{node}'s NodeName line is in {e.where()} (included): merge Gres there")
        replace[e.lineno] = [merged_node_line(e, node, cpus, memory_mb, gres, entries)]
    if not nodes:
        append.append(merged_node_line(None, node, cpus, memory_mb, gres, entries))
    for key, value in values.items():
        found = settings(entries, key)
        if len(found) > 1:
            raise SlurmConfError(f"{key} is set {len(found)} times (" + ", ".join(e.where() for e in found)
                                 + "): Slurm keeps only the last; keep one line")
        if not found:
            append.append(f"{key}={value}")
            continue
        e = found[0]
        if e.file != path:
            raise SlurmConfError(f"{key} is set in {e.where()} (included): set it there to {value}")
        if e.get(key) == value:
            continue
        pairs = [(k, value if k.lower() == key.lower() else v) for k, v in e.pairs]
        replace[e.lineno] = [" ".join(f"{k}={v}" for k, v in pairs)]
    out = []
    for lineno, raw in enumerate(lines, 1):
        if lineno in replace and replace[lineno] != [raw.strip()]:
            out.append(f"# gpu-router slurm-conf: was: {raw.strip()}")
            out += replace[lineno]
        else:
            out.append(raw)
    if append:
        out += ["", "# gpu-router slurm-conf (added):"] + append
    return "\n".join(out) + "\n"


def gres_conf_path(path=None):
    """gres.conf lives beside slurm.conf (Slurm reads it from the same folder)."""
    return os.path.join(os.path.dirname(path or conf_path()), "gres.conf")


def gres_lines(path):
    """gres.conf's lines as Entries ([] when the file is absent: it is optional for Slurm)."""
    if not os.path.exists(path):
        return []
    return read(path)


def merged_gres_conf(path, node, ours):
    """The live gres.conf (or nothing) with this node's gpu-router lines replaced by ours."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as exc:
        raise SlurmConfError(f"cannot read {path}: {exc.strerror or exc}") from None
    wanted = set(expand_hostlist(node))
    out = []
    for raw in lines:
        pairs = dict((k.lower(), v) for k, v in split_pairs(raw))
        mine = GR.match(pairs.get("name", "")) and (
            "nodename" not in pairs or wanted & set(expand_hostlist(pairs["nodename"])))
        if not mine:
            out.append(raw)
    out += ours
    return "\n".join(out) + "\n"


def check(path, node, cpus, gres, wanted):
    """What is missing from, or conflicts in, the live files for this node: (problems, notes).

    A problem stops Slurm or makes it count wrong (gpu-router's jobs then exit 75, or wait for ever); a note is
    a recommendation the site may have overruled on purpose."""
    entries = read(path)
    problems, notes = [], []
    for key in ("SchedulerParameters", "GresTypes", "RequeueExit", "AuthInfo"):
        found = settings(entries, key)
        if len(found) > 1:
            problems.append(f"{key} is set {len(found)} times (" + ", ".join(e.where() for e in found)
                            + "): Slurm keeps only the last, the others' options are lost; keep one line")
    merged = merged_settings(entries, wanted)
    types = set()
    for e in settings(entries, "GresTypes"):
        types.update(x for x in e.get("GresTypes").split(",") if x)
    missing = [g for g in wanted["GresTypes"].split(",") if g not in types]
    if missing:
        problems.append(f"GresTypes lacks {','.join(missing)} (GresTypes={merged['GresTypes']})")
    requeue = settings(entries, "RequeueExit")
    have = codes(requeue[-1].get("RequeueExit")) if requeue else set()
    lacking = sorted(codes(wanted["RequeueExit"]) - have)
    if lacking:
        problems.append(f"RequeueExit does not contain the retry code {','.join(map(str, lacking))}: a job "
                        f"refused for lack of room is not requeued (RequeueExit={merged['RequeueExit']})")
    for key, option, why in (("SchedulerParameters", "sched_interval", "a freed place is given out at the next "
                              "scheduler pass (60 s by default)"),
                             ("AuthInfo", "cred_expire", "a requeued job waits cred_expire + 1 s (121 s by "
                              "default) before it is eligible again")):
        found = settings(entries, key)
        site = found[-1].get(key) if found else ""
        if not any(option_name(x) == option for x in site.split(",")):
            notes.append(f"{key} has no {option}: {why} ({key}={merged[key]})")
    nodes = node_lines(entries, node)
    if len(nodes) > 1:
        problems.append(f"{node} is named by {len(nodes)} NodeName lines (" + ", ".join(e.where() for e in nodes)
                        + "): slurmctld stops (fatal: Duplicated NodeHostName); keep one, with the Gres merged")
    elif not nodes:
        problems.append(f"no NodeName line names {node}")
    else:
        line = nodes[0]
        node_cpus = node_value(entries, line, "CPUs")
        if node_cpus is None:
            problems.append(f"{line.where()}: the node line has no CPUs= (Slurm then counts 1 CPU and runs one job "
                            f"at a time): CPUs={cpus}")
        elif node_cpus.isdigit() and int(node_cpus) > cpus and not any(
                "config_overrides" in (e.get("SlurmdParameters") or "") for e in settings(entries, "SlurmdParameters")):
            notes.append(f"{line.where()}: CPUs={node_cpus} but this host has {cpus} (slurmd drains a node with "
                         f"fewer CPUs than configured, unless SlurmdParameters=config_overrides)")
        if node_value(entries, line, "RealMemory") is None:
            notes.append(f"{line.where()}: the node line has no RealMemory= (Slurm counts 1 MB; jobs with --mem "
                         f"never start there)")
        site = {x.split(":", 1)[0]: x for x in (line.get("Gres") or "").split(",") if x}
        for item in gres:
            name = item.split(":", 1)[0]
            if site.get(name) != item:
                problems.append(f"{line.where()}: the node line's Gres= lacks {item}"
                                + (f" (has {site[name]})" if name in site else ""))
        stale = [x for x in site if GR.match(x) and x not in {i.split(":", 1)[0] for i in gres}]
        if stale:
            notes.append(f"{line.where()}: Gres= has {','.join(stale)}, which no profile here counts any more")
    gpath = gres_conf_path(path)
    counts = {}
    wanted_nodes = set(expand_hostlist(node))
    for e in gres_lines(gpath):
        pairs = {k.lower(): v for k, v in e.pairs}
        if "nodename" in pairs and not wanted_nodes & set(expand_hostlist(pairs["nodename"])):
            continue
        if GR.match(pairs.get("name", "")):
            counts.setdefault(pairs["name"], []).append(pairs.get("count", "1"))
    for item in gres:
        name, count = item.split(":", 1)
        if counts.get(name) != [count]:
            problems.append(f"{gpath}: " + (f"no line Name={name} Count={count}" if name not in counts else
                                            f"Name={name} has Count={'+'.join(counts[name])}, not {count}"))
    return problems, notes
