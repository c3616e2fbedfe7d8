#!/bin/sh
# The VM lane's payload (runs as the oneshot gpu-router-vm-payload.service; the VM powers off when it ends).
# Everything it has to say goes to /work/out, which the host reads back with debugfs.
out=/work/out
exec >"$out/payload.log" 2>&1
set -x
date +%s.%N >"$out/t_start"
# Flush /work/out now and then: after a timeout the host still reads how far the payload got.
(while sleep 10; do sync; done) &
cat /proc/cmdline
stat -fc %T /sys/fs/cgroup
systemctl --version | head -1
export DEBIAN_FRONTEND=noninteractive
# Offline: every dependency is in the image already.
apt-get install -y -q --no-install-recommends /work/gpu-router.deb >"$out/apt.log" 2>&1
echo $? >"$out/apt.rc"
date +%s.%N >"$out/t_installed"
cd /work/guest
python3 -m pytest -p no:cacheprovider -v -rA checks.py >"$out/pytest.log" 2>&1
echo $? >"$out/pytest.rc"
date +%s.%N >"$out/t_tests"
journalctl -b -o json GPU_ROUTER_EVENT=job-finished >"$out/finished.json" 2>/dev/null
journalctl -b -o short-monotonic -u gpu-router-agent.service >"$out/agent.log" 2>&1
journalctl -b -o short-monotonic -p warning >"$out/warnings.log" 2>&1
cd /
sync
exit 0
