//! Placement benchmark: 10,000 hosts and 100,000 VMs in services with anti-affinity (by host and by
//! site), pinning (to a host and to a label), minimum security and cost limits, placed one by one
//! in-process. Prints placements per second and memory used; `bench/placement.sh` runs it several
//! times and reports medians.
//!
//! Usage: placement [HOSTS] [VMS]

use std::time::Instant;

use drover_cluster::{HostInventory, HostRecord, HostStatus, Request, Scheduler, Service};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Time this thread spent on a CPU, in seconds (the machine is shared: wall time overstates).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let host_count: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let vm_count: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let rss_start = rss_kib("VmRSS:");

    // Hosts: four shapes, 100 sites, a label on every fourth, security 0-3, three price lists.
    let hosts: Vec<HostRecord> = (0..host_count)
        .map(|i| {
            let (cpus, gib) = [(16, 64), (32, 128), (64, 256), (8, 32)][i % 4];
            let mut inv = HostInventory::new(&format!("host-{i:05}"), cpus, gib << 30, 2 << 40);
            inv.site = format!("site-{:03}", i % 100);
            inv.security_level = (i % 4) as u8;
            if i % 4 == 0 {
                inv.labels.insert("ssd".into(), "yes".into());
            }
            inv.cost.vcpu_hour = [0.02, 0.03, 0.05][i % 3];
            inv.cost.gib_hour = [0.004, 0.005, 0.006][i % 3];
            inv.cost.disk_gib_month = 0.05;
            HostRecord {
                inventory: inv,
                status: if i % 97 == 0 {
                    HostStatus::Draining
                } else {
                    HostStatus::Up
                },
            }
        })
        .collect();

    // Services of 10 VMs each, in four kinds.
    let kinds = [
        // web tier kept apart by host, a db on an ssd host, cheapest caches under a cost limit.
        r#"
[[app]]
name = "db"
cpus = 2
memory = "4G"
disk = "20G"
pin_label = "ssd=yes"
[[app]]
name = "web"
cpus = 1
memory = "1G"
replicas = 6
after = ["db"]
anti_affinity = "host"
[[app]]
name = "cache"
cpus = 1
memory = "2G"
replicas = 3
strategy = "cheapest"
max_cost_per_hour = 0.1
"#,
        // replicas spread over sites, with a minimum security level.
        r#"
strategy = "spread"
[[app]]
name = "api"
cpus = 2
memory = "2G"
replicas = 10
anti_affinity = "site"
min_security = 2
"#,
        // one member pinned to a host, the rest binpacked.
        r#"
[[app]]
name = "ctl"
cpus = 1
memory = "512M"
pin_host = "PIN"
[[app]]
name = "worker"
cpus = 2
memory = "2G"
replicas = 9
"#,
        // a batch of cheap workers under a cost limit, apart by host.
        r#"
strategy = "cheapest"
[[app]]
name = "job"
cpus = 1
memory = "1G"
replicas = 10
anti_affinity = "host"
max_cost_per_hour = 0.06
"#,
    ];
    let services: Vec<Service> = (0..vm_count / 10)
        .map(|i| {
            let body = kinds[i % kinds.len()]
                .replace("PIN", &format!("host-{:05}", (i * 7919) % host_count));
            Service::from_toml(&format!("name = \"svc-{i:06}\"\n{body}"))
        })
        .collect::<Result<_, _>>()?;
    let requests: Vec<_> = services.iter().flat_map(|s| s.members()).collect();

    let mut sched = Scheduler::new(&hosts);
    let rss_ready = rss_kib("VmRSS:");
    let start = Instant::now();
    let cpu_start = cpu_seconds();
    let mut placed = 0usize;
    let mut pending = 0usize;
    let mut pending_cpu = 0.0;
    for (member, app) in &requests {
        let before = cpu_seconds();
        match sched.place(&Request::new(member, app)) {
            Ok(_) => placed += 1,
            Err(_) => {
                pending += 1;
                pending_cpu += cpu_seconds() - before;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let rss_end = rss_kib("VmRSS:");
    println!(
        "{{\"hosts\": {host_count}, \"vms\": {}, \"placed\": {placed}, \"pending\": {pending}, \"seconds\": {secs:.3}, \"cpu_seconds\": {cpu:.3}, \"pending_cpu_seconds\": {pending_cpu:.3}, \"placements_per_s\": {:.0}, \"placements_per_cpu_s\": {:.0}, \"rss_start_mib\": {:.1}, \"rss_inputs_mib\": {:.1}, \"rss_end_mib\": {:.1}, \"peak_mib\": {:.1}}}",
        requests.len(),
        requests.len() as f64 / secs,
        requests.len() as f64 / cpu,
        rss_start as f64 / 1024.0,
        rss_ready as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_kib("VmHWM:") as f64 / 1024.0,
    );
    Ok(())
}
