#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `hydra/launcher=slurm` and for the tests
# marked slow: munge, slurmctld and slurmd on localhost, one partition "local" holding every core.
# Needs root and Debian's packages: apt-get install slurm-wlm munge (installed here if missing).
#   bash scripts/local-slurm.sh          start it (again: restarts it); prints `sinfo` when ready
#   bash scripts/local-slurm.sh stop     stop the daemons
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "local-slurm.sh must run as root (it starts munged, slurmctld and slurmd)." >&2
  exit 1
fi
stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  sleep 1
}
if [ "${1:-start}" = stop ]; then
  stop
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
stop

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge /etc/munge
cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
SchedulerParameters=defer_batch
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
printf '# cgroup plugin: detected by slurmd (no limits are enforced on this node)\n' > "$conf_dir/cgroup.conf"

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
if id munge >/dev/null 2>&1; then
  su -s /bin/sh munge -c "munged --force" || munged --force
else
  munged --force
fi
slurmctld
slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    sinfo
    exit 0
  fi
  sleep 0.5
done
echo "SLURM did not become ready in 30 s; see /var/log/slurm/slurmctld.log and slurmd.log." >&2
exit 1
