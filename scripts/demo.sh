#!/usr/bin/env bash
# Drover's main job on one host, from a fresh Debian 12 machine: installs what it needs, builds
# Drover, starts droverd (embedded store, /var/lib/drover, socket /run/drover/drover.sock), builds
# the guest image, boots a demo VM and talks to its agent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
PROFILE=release scripts/build.sh
bin=$PWD/target/release
agent=$PWD/target/x86_64-unknown-linux-gnu/release/drover-agent
ln -sf "$bin/drover" /usr/local/bin/drover
ln -sf "$bin/droverd" /usr/local/bin/droverd
mkdir -p /var/log/drover
if ! drover host info >/dev/null 2>&1; then
  echo "==> starting droverd (log: /var/log/drover/droverd.log)" >&2
  nohup droverd --agent-binary "$agent" >>/var/log/drover/droverd.log 2>&1 &
  for _ in $(seq 100); do drover host info >/dev/null 2>&1 && break; sleep 0.1; done
fi
drover host info
echo "==> building the guest image" >&2
drover image build
if ! drover vm show demo >/dev/null 2>&1; then
  drover vm create demo --cpus 2 --memory 512M --disk size=1G,id=data --nic user,forward=tcp:127.0.0.1:2222-:22
fi
state=$(drover --output json vm show demo | sed -n 's/^  "state": "\(.*\)",$/\1/p')
if [ "$state" != running ]; then
  drover vm start demo --wait
fi
echo "==> asking the agent inside the demo VM" >&2
drover vm exec demo -- sh -c 'echo "hello from $(hostname): $(uname -sr), $(nproc) vCPUs, $(awk "/MemTotal/ {print int(\$2/1024)}" /proc/meminfo) MiB, data disk $(cat /sys/block/vda/serial)"'
drover vm list
cat <<'TXT'

Drover is running. Try next:
  drover vm exec demo -- ps            # run a command inside the guest
  drover vm console demo               # the guest's serial console (--follow to keep watching)
  drover vm stop demo                  # graceful stop (agent, then ACPI, then kill)
  drover vm create web --cpus 1 --memory 256M --disk 2G && drover vm start web --wait
  drover --help                        # everything else; add --output json for scripts
TXT
