"""gpu-router from the checkout (/src) inside a lane container, laid out as the package does, with a fake GPU.

Used by the lanes that need the whole stack but not the .deb (test_slurm.py, test_runner_service.py): launchers
in /usr/bin and /usr/sbin, units in /etc/systemd/system, tmpfiles.d, the agent running with the nvidia-smi backend
on tests/fakenvml's fake nvidia-smi, whose one GPU lives in FAKE_STATE (fake_gpu_job.py claims VRAM there).
"""

FAKE_STATE = "/var/lib/fakegpu"

# The checkout laid out as the package lays itself out (launchers, units, tmpfiles.d, the group); the lanes that
# install from /src add their own lines, then START. The launchers keep dist-packages after the checkout: the
# agent needs pystemd and prometheus_client from Debian.
TREE = r"""
set -e
mkdir -p /opt/gpu-router/lib /etc/gpu-router
ln -sfn /src/agent /opt/gpu-router/lib/gpu_router
sed 's#^sys.path.append("/usr/lib/python3/dist-packages")#sys.path.insert(0, "/opt/gpu-router/lib"); &#' /src/packaging/bin/gpu-router > /usr/bin/gpu-router
printf '#!/usr/bin/python3 -I\nimport sys\nsys.path.insert(0, "/opt/gpu-router/lib")\nsys.path.append("/usr/lib/python3/dist-packages")\nfrom gpu_router.daemon.service import main\nsys.exit(main())\n' > /usr/sbin/gpu-router-agent
chmod 755 /usr/bin/gpu-router /usr/sbin/gpu-router-agent
cp /src/units/* /etc/systemd/system/
cp /src/packaging/tmpfiles.d/gpu-router.conf /usr/lib/tmpfiles.d/gpu-router.conf
getent group gpu-router >/dev/null || groupadd --system gpu-router
systemd-tmpfiles --create gpu-router.conf
"""
START = r"""
systemctl daemon-reload
systemctl enable --now gpu-router-agent.socket gpu-router-agent.service
"""
INSTALL = TREE + r"""
mkdir -p "$STATE/gpu0" "$STATE/claims" "$STATE/gpu0/accounted"
chmod 1777 "$STATE/claims" "$STATE/gpu0/accounted"   # jobs of every user write their claims and accounting records
printf '%s\nGPU-00000000-fake-lane\nFake GPU\n' "$GPU_MB" > "$STATE/gpu0/info"
chmod 666 "$STATE/gpu0/info"; touch "$STATE/lock"; chmod 666 "$STATE/lock"
""" + START


def fake_smi():
    from fakenvml import SMI_TEMPLATE  # tests/ is on sys.path (its conftest)

    return SMI_TEMPLATE.replace("@FAKEDIR@", repr("/src/tests/fakenvml")).replace("@STATE@", repr(FAKE_STATE))


def install(c, config, gpu_mb=16384):
    """Config, fake nvidia-smi, gpu-router and its agent; returns when the agent's snapshot shows the GPU."""
    c.write_file("/etc/gpu-router/config.toml", config)
    c.write_file("/usr/local/bin/nvidia-smi", fake_smi(), mode=0o755)
    c.run(INSTALL, env={"GPU_MB": str(gpu_mb), "STATE": FAKE_STATE}, timeout=120)
    c.wait_for(f"gpu-router status --json | grep -q '\"total_mb\": {gpu_mb}'", timeout=30)
