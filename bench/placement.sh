#!/usr/bin/env bash
# Placement benchmark: 10,000 hosts, 100,000 VMs (services with anti-affinity by host and site,
# pinning to a host and a label, security and cost limits), placed in-process one by one.
# Runs the release example RUNS times (default 5) and prints each run and the medians.
# Usage: bench/placement.sh [RUNS] [HOSTS] [VMS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
hosts=${2:-10000}
vms=${3:-100000}
cargo build --release -q -p drover-cluster --example placement
out=$(for _ in $(seq "$runs"); do target/release/examples/placement "$hosts" "$vms"; done)
echo "$out"
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
med = lambda k: statistics.median(r[k] for r in runs)
print(f"median of {len(runs)} runs: {med('placements_per_s'):.0f} placements/s wall, "
      f"{med('placements_per_cpu_s'):.0f} per CPU-second "
      f"({med('seconds'):.2f} s for {runs[0]['vms']} VMs on {runs[0]['hosts']} hosts, "
      f"{runs[0]['placed']} placed, {runs[0]['pending']} pending); "
      f"memory: {med('rss_inputs_mib') - med('rss_start_mib'):.1f} MiB inputs + scheduler, "
      f"{med('rss_end_mib') - med('rss_inputs_mib'):.1f} MiB placement state, peak {med('peak_mib'):.1f} MiB")
PY
