"""Who already confines a process: a job manager's own cgroup (a Slurm step), which gpu-router must not leave.

Slurm's proctrack/cgroup and task/cgroup keep each step in a cgroup of its own: its memory limit (``--mem``),
its accounting (``sacct``) and ``scancel`` act on that cgroup. Moving the job's PID into a systemd scope would take
it out of all three. So where this module finds such a cgroup, the wrapper makes no scope and the job stays where
its manager put it; ``scope = "required"`` is met ("confined by someone").

The rule (deliberately narrow): a process is confined when a line of /proc/PID/cgroup names a Slurm step,
``…/slurmstepd.scope/job_<id>/step_<step>…`` (cgroup v2, slurmd under systemd; Debian's build, with
multiple-slurmd support, names it ``<node>_slurmstepd.scope``) or ``…/slurm…/uid_<uid>/job_<id>/
step_<step>…`` (cgroup v1), and Slurm's own cgroup above the jobs (slurmstepd.scope, /slurm) belongs to root (the
job's own folders may be given to the job's user). Slurm's environment variables
(SLURM_JOB_ID, …) are not looked at: anyone can set them. Nor is a memory limit somewhere above the process: a
runner's own service with MemoryMax= is not a job manager, and the job still gets its per-job scope there. A
member cannot fake the path: cgroups are made by root, and the only ones a member may make (a delegated subtree,
user@UID.service) belong to that member, which the owner check refuses.

``parse`` is meant as the one parser of /proc/PID/cgroup (issue 20): new code should use it.
"""

from . import fastos as os  # os without its import cost (fastos.py)

CGROUP_ROOT = "/sys/fs/cgroup"
PROC = "/proc"   # read at each call of read(): tests point it at a folder laid out like /proc


class Confinement:
    """A job manager's cgroup holding the process: who ("slurm"), the job and step, and the cgroup directory."""
    __slots__ = ("manager", "job", "step", "cgroup")

    def __init__(self, manager, job, step, cgroup):
        self.manager, self.job, self.step, self.cgroup = manager, job, step, cgroup

    @property
    def label(self):
        """What the wrapper's events carry as SCOPE=: slurm:<job>.<step>."""
        return f"{self.manager}:{self.job}.{self.step}"

    def __repr__(self):
        return f"Confinement({self.label!r}, {self.cgroup!r})"


def parse(text):
    """/proc/PID/cgroup → [(controllers, path)]; controllers "" is the cgroup v2 (unified) hierarchy."""
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def read(pid="self", proc=None):
    """The parsed /proc/PID/cgroup, [] when it cannot be read (the process is gone, no /proc); a live process
    always has a line, so [] also says "gone"."""
    proc = PROC if proc is None else proc
    try:
        fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return parse(os.read(fd, 65536).decode("utf-8", "replace"))
    finally:
        os.close(fd)


def systemd_path(lines):
    """The path in systemd's own hierarchy (cgroup v2, else v1's name=systemd): where its units show, or ""."""
    paths = dict(lines)
    return paths.get("") or paths.get("name=systemd") or ""


def unit_of(lines):
    """The systemd unit (a .service or .scope, never init.scope) the parsed lines put the process in, or None."""
    name = systemd_path(lines).rstrip("/").rsplit("/", 1)[-1]
    return name if name.endswith((".service", ".scope")) and name != "init.scope" else None


def service_of(lines):
    """The nearest .service above (or at) the process's place in systemd's hierarchy, or None."""
    for part in reversed(systemd_path(lines).split("/")):
        if part.endswith(".service"):
            return part
    return None


def memory_path(lines):
    """(controllers, path) of the hierarchy holding the memory controller: v1's memory line where there is one
    (hybrid), else the v2 line; None without either."""
    found = None
    for controllers, path in lines:
        if controllers == "memory" or "memory" in controllers.split(","):
            return controllers, path
        if controllers == "":
            found = (controllers, path)
    return found


def slurm_step(path):
    """(job id, step, the cgroup Slurm made above its jobs) when `path` is a Slurm step's cgroup, else None."""
    parts = path.split("/")
    for i in range(1, len(parts) - 1):
        job, step = parts[i], parts[i + 1]
        if not (job.startswith("job_") and job[4:].isdigit() and step.startswith("step_") and step[5:]
                and step[5:].replace("_", "").isalnum()):
            continue
        parent = parts[i - 1]
        v2 = parent == "slurmstepd.scope" or parent.endswith("_slurmstepd.scope")   # <node>_…: multiple-slurmd
        v1 = parent.startswith("uid_") and parent[4:].isdigit() and i >= 2 and parts[i - 2].startswith("slurm")
        if v2 or v1:   # the manager's own top: slurmstepd.scope (v2), /slurm… above uid_N (v1)
            return job[4:], step[5:], "/".join(parts[:i] if v2 else parts[:i - 1])
    return None


def hierarchy_dir(controllers, root=CGROUP_ROOT):
    """Where a hierarchy of /proc/PID/cgroup is mounted: v2 at the root (pure) or root/unified (hybrid); a v1
    controller list under its own name (name=systemd → systemd)."""
    if controllers == "":
        return root if os.path.exists(root + "/cgroup.controllers") else root + "/unified"
    return root + "/" + controllers.replace("name=", "")


def systemd_root(root=None):
    """Where systemd's own hierarchy (its units' cgroups) is mounted: v2, or the unified/name=systemd tree on a
    hybrid host. ``root``: the cgroup file system's mount point (CGROUP_ROOT, read at each call)."""
    root = CGROUP_ROOT if root is None else root
    if os.path.exists(root + "/cgroup.controllers"):
        return root
    if os.path.exists(root + "/unified/cgroup.procs"):
        return root + "/unified"
    return root + "/systemd"


def classify(lines, root=CGROUP_ROOT):
    """The Confinement the parsed lines show (cgroup v2 first), or None; the owner check is done here."""
    for controllers, path in sorted(lines, key=lambda cp: cp[0] != ""):
        found = slurm_step(path)
        if found is None:
            continue
        job, step, top = found
        base = hierarchy_dir(controllers, root)
        try:
            if os.stat(base + top).st_uid != 0:
                continue       # made by a member (a delegated subtree): not Slurm's
        except OSError:
            continue
        return Confinement("slurm", job, step, base + path)
    return None


def find(pid="self", root=CGROUP_ROOT):
    """The job manager confining process `pid` (default: this one), or None."""
    return classify(read(pid), root)


def step_account(lines, root=None):
    """(Confinement, the step's path in the memory hierarchy) for the agent's accounting of a job Slurm confines
    (what accounting.memory_dir takes; None where Slurm does not hold its memory: v1 without task/cgroup's memory
    part), or None when no Slurm step holds it. The step, not the task below it (…/user/task_0): slurmstepd removes
    a task's cgroup as the task ends, the step's lives until slurmstepd is done. The agent only reads there."""
    root = CGROUP_ROOT if root is None else root
    held = classify(lines, root)
    if held is None:
        return None
    controllers, path = memory_path(lines) or ("", "")
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        found = slurm_step("/".join(parts[:i]))
        if found is None:
            continue
        if found[:2] != (held.job, held.step):
            break
        try:
            if os.stat(hierarchy_dir(controllers, root) + found[2]).st_uid != 0:
                break      # as in classify: a member's look-alike
        except OSError:
            break
        return held, "/".join(parts[:i])
    return held, None
