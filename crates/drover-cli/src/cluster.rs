//! Cluster commands: `drover service ...`, `drover host list`, `drover cluster status`.
//!
//! They talk to the cluster's etcd, found from `--etcd URLS`, `$DROVER_ETCD`, or the
//! `cluster.toml` beside the remotes file (written by `scripts/cluster.sh up` or
//! `drover cluster use`). Reading and explaining need no controller; what members do is
//! reported by the leading controller.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use comfy_table::{presets::NOTHING, Table};
use drover_cluster::etcd::Etcd;
use drover_cluster::service::app_of;
use drover_cluster::{HostRecord, MemberState, Needs, Request, Scheduler, Service};
use serde::{Deserialize, Serialize};

use crate::output::{fmt_bytes, Out};

/// Where the cluster's etcd is.
#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// The cluster's etcd endpoints (comma-separated); default: $DROVER_ETCD, else the
    /// cluster registered with `drover cluster use`.
    #[arg(long, env = "DROVER_ETCD", value_delimiter = ',', value_name = "URLS")]
    etcd: Vec<String>,
}

/// `drover service ...`.
#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Create or replace a service from its TOML file (checked first: nothing is applied if
    /// it has errors).
    ///
    /// Examples:
    ///   drover service apply -f shop.toml
    ///   drover service apply -f shop.toml --output json
    #[command(verbatim_doc_comment)]
    Apply {
        /// The service file.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// List the services and whether each is available.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// A service's members: host and state; `available` when all run and are ready (agent up,
    /// and the app's `ready = "CMD"` exited 0). A member that is not says why.
    /// Exits 0 when available, 4 when not (so scripts can wait for it).
    ///
    /// Examples:
    ///   until drover service show shop >/dev/null; do sleep 1; done
    ///   drover service show shop
    ///   drover service show shop --output json   # each member's name, host and state
    #[command(verbatim_doc_comment)]
    Show {
        /// The service.
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Where each member goes and, for every other host, why not.
    ///
    /// Example:
    ///   drover service explain shop
    ///   web-2  -> h2
    ///          h1: anti-affinity with web-1
    ///          h3: memory short by 512 MiB
    #[command(verbatim_doc_comment)]
    Explain {
        /// The service.
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete a service; the controller stops and removes its members.
    #[command(alias = "rm")]
    Delete {
        /// The service.
        name: String,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// `drover cluster ...`.
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Is etcd reachable, who leads, how many hosts are up. Exits 4 when no controller leads.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// What each service's members used and what it cost, at the prices their hosts
    /// registered (`[cost]` in their `host.toml`). Counted by the leading controller while it
    /// sees members running: a lower bound (time without a leading controller is not counted).
    ///
    /// Examples:
    ///   drover cluster usage
    ///   drover cluster usage --by host
    ///   drover cluster usage --service shop --by app --output json
    #[command(verbatim_doc_comment)]
    Usage {
        /// One row per service, per app of a service, or per host.
        #[arg(long, value_enum, default_value = "service")]
        by: UsageBy,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Make these etcd endpoints the default cluster for this user.
    ///
    /// Example:
    ///   drover cluster use http://10.77.0.2:2379,http://10.77.0.3:2379
    #[command(verbatim_doc_comment)]
    Use {
        /// etcd endpoints, comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
    },
}

/// How `drover cluster usage` groups its rows.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum UsageBy {
    /// One row per service.
    Service,
    /// One row per app of each service.
    App,
    /// One row per host.
    Host,
}

impl From<UsageBy> for drover_cluster::usage::GroupBy {
    fn from(b: UsageBy) -> Self {
        match b {
            UsageBy::Service => Self::Service,
            UsageBy::App => Self::App,
            UsageBy::Host => Self::Host,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    etcd: Vec<String>,
}

fn cluster_file() -> anyhow::Result<PathBuf> {
    let remotes = crate::remotes::config_file()?;
    Ok(remotes.with_file_name("cluster.toml"))
}

async fn connect(args: &EtcdArgs) -> anyhow::Result<Etcd> {
    let endpoints = if !args.etcd.is_empty() {
        args.etcd.clone()
    } else {
        let path = cluster_file()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str::<ClusterFile>(&text)
                    .with_context(|| format!("reading {}", path.display()))?
                    .etcd
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no cluster known: pass --etcd URLS, set DROVER_ETCD, or run `drover cluster use URLS`")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    };
    Ok(Etcd::connect(&endpoints, "/drover", Duration::from_secs(3)).await?)
}

/// What `service show --output json` prints.
#[derive(Serialize)]
struct ServiceView {
    name: String,
    available: bool,
    /// The controller that last reported, `None` before any did.
    reported_by: Option<String>,
    members: Vec<MemberView>,
    /// Apps with a scale rule.
    scale: Vec<ScaleView>,
}

#[derive(Serialize)]
struct MemberView {
    /// `web-1`.
    name: String,
    host: Option<String>,
    /// `ready`, `starting`, `waiting`, `pending`, ...: [`MemberState::kind`].
    state: &'static str,
    /// What a person reads: `starting on h2`, `waiting for db-1 (starting)`.
    detail: String,
    /// Everything the controller reported of it.
    #[serde(rename = "status")]
    full: MemberState,
}

/// An app with a scale rule: its members now and why.
#[derive(Debug, Serialize)]
struct ScaleView {
    app: String,
    replicas: u32,
    /// The last change (`scaled out to 3: cpu 0.91 > 0.80 over 2 members`); `None` before any.
    why: Option<String>,
}

async fn view(etcd: &Etcd, service: &Service) -> anyhow::Result<ServiceView> {
    let status = etcd.status(&service.name).await?;
    // Scaled apps run as many members as their stored target says.
    let targets = etcd.scale_targets().await?;
    let mut scaled = [service.clone()];
    drover_cluster::scale::apply_targets(&mut scaled, &targets);
    let [service] = &scaled;
    let scale: Vec<ScaleView> = service
        .apps
        .iter()
        .filter(|a| a.scale.is_some())
        .map(|a| ScaleView {
            app: a.name.clone(),
            replicas: a.replicas,
            why: targets
                .get(&(service.name.clone(), a.name.clone()))
                .map(|t| t.why.clone()),
        })
        .collect();
    let reported: BTreeMap<_, _> = status
        .as_ref()
        .map(|s| s.members.iter().cloned().collect())
        .unwrap_or_default();
    let members: Vec<MemberView> = service
        .members()
        .map(|(m, _)| {
            let state = reported.get(&m).cloned().unwrap_or(MemberState::Pending {
                reason: "no controller has reported it yet".into(),
            });
            MemberView {
                name: m.short(),
                host: state.host().map(str::to_string),
                state: state.kind(),
                detail: state.describe(),
                full: state,
            }
        })
        .collect();
    Ok(ServiceView {
        name: service.name.clone(),
        available: members.iter().all(|m| m.full.is_ready()),
        reported_by: status.map(|s| s.controller),
        members,
        scale,
    })
}

/// Run a `drover service` command.
pub async fn service_cmd(cmd: ServiceCmd, out: &Out) -> anyhow::Result<u8> {
    match cmd {
        ServiceCmd::Apply { file, etcd } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let service = Service::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was applied", file.display()))?;
            let etcd = connect(&etcd).await?;
            etcd.put_service(&service.name, &text).await?;
            out.json_only(&serde_json::json!({"applied": service.name}));
            out.line(&format!(
                "applied service {} ({} members); `drover service show {}` follows it",
                service.name,
                service.members().count(),
                service.name
            ));
        }
        ServiceCmd::List { etcd } => {
            let etcd = connect(&etcd).await?;
            let mut views = Vec::new();
            for s in etcd.services().await? {
                views.push(view(&etcd, &s).await?);
            }
            if out.is_json() {
                out.json_only(&views);
            } else if views.is_empty() {
                println!("no services (add one with `drover service apply -f FILE`)");
            } else {
                let mut t = Table::new();
                t.load_preset(NOTHING);
                t.set_header(["NAME", "MEMBERS", "READY", "STATE"]);
                for v in &views {
                    let ready = v.members.iter().filter(|m| m.full.is_ready()).count();
                    let state = if v.available {
                        "available"
                    } else {
                        "not available"
                    };
                    t.add_row([
                        v.name.clone(),
                        v.members.len().to_string(),
                        ready.to_string(),
                        state.into(),
                    ]);
                }
                println!("{t}");
            }
        }
        ServiceCmd::Show { name, etcd } => {
            let etcd = connect(&etcd).await?;
            let service = find(&etcd, &name).await?;
            let v = view(&etcd, &service).await?;
            if out.is_json() {
                out.json_only(&v);
            } else {
                if v.available {
                    println!("service {}: available", v.name);
                } else {
                    let missing: Vec<&str> = v
                        .members
                        .iter()
                        .filter(|m| !m.full.is_ready())
                        .map(|m| m.name.as_str())
                        .collect();
                    println!(
                        "service {}: not available ({} not ready)",
                        v.name,
                        missing.join(", ")
                    );
                }
                let mut t = Table::new();
                t.load_preset(NOTHING);
                t.set_header(["MEMBER", "HOST", "STATE"]);
                for m in &v.members {
                    t.add_row([
                        m.name.clone(),
                        m.host.clone().unwrap_or("-".into()),
                        m.detail.clone(),
                    ]);
                }
                println!("{t}");
                for sc in &v.scale {
                    let why = sc
                        .why
                        .as_deref()
                        .unwrap_or("as the file says, not scaled yet");
                    println!("{}: {} members ({why})", sc.app, sc.replicas);
                }
            }
            return Ok(if v.available { 0 } else { 4 });
        }
        ServiceCmd::Explain { name, etcd } => {
            let etcd = connect(&etcd).await?;
            let service = find(&etcd, &name).await?;
            let explanations = explain(&etcd, &service).await?;
            if out.is_json() {
                out.json_only(&explanations);
            } else {
                for e in &explanations {
                    let head = match &e.chosen {
                        Some(h) => format!("{:<8} -> {h}", e.member.short()),
                        None => format!("{:<8} -> no host fits: pending", e.member.short()),
                    };
                    println!("{head}");
                    for (host, why) in &e.rejected {
                        println!("         {host}: {why}");
                    }
                }
            }
        }
        ServiceCmd::Delete { name, etcd } => {
            let etcd = connect(&etcd).await?;
            if !etcd.delete_service(&name).await? {
                bail!("no service {name} (see `drover service list`)");
            }
            out.json_only(&serde_json::json!({"deleted": name}));
            out.line(&format!(
                "deleted service {name}; the controller stops its members"
            ));
        }
    }
    Ok(0)
}

async fn find(etcd: &Etcd, name: &str) -> anyhow::Result<Service> {
    etcd.services()
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no service {name} (see `drover service list`)"))
}

/// Explain a service against the cluster as it is: every other service's assigned members
/// hold their resources; this service's members are placed in start order.
async fn explain(
    etcd: &Etcd,
    service: &Service,
) -> anyhow::Result<Vec<drover_cluster::Explanation>> {
    let hosts = etcd.hosts().await?;
    let services = etcd.services().await?;
    let mut sched = Scheduler::new(&hosts);
    for a in etcd.assignments().await? {
        if a.member.service == service.name {
            continue;
        }
        let needs = app_of(&services, &a.member).map(|app| app.needs);
        if let Some(needs) = needs {
            sched.record(&a.member, needs, &a.host);
        }
    }
    let mut out = Vec::new();
    for (m, app) in service.members() {
        let req = Request::new(&m, app);
        out.push(sched.explain(&req));
        let _ = sched.place(&req);
    }
    Ok(out)
}

/// `drover host list`: every host of the cluster, up/down/draining, free and used resources.
pub async fn host_list(args: EtcdArgs, out: &Out) -> anyhow::Result<u8> {
    let etcd = connect(&args).await?;
    let hosts: Vec<HostRecord> = etcd.hosts().await?;
    let services = etcd.services().await?;
    let mut used: BTreeMap<String, (Needs, usize)> = BTreeMap::new();
    for a in etcd.assignments().await? {
        let needs = app_of(&services, &a.member)
            .map(|app| app.needs)
            .unwrap_or_default();
        let u = used.entry(a.host.clone()).or_default();
        u.0.cpus += needs.cpus;
        u.0.memory += needs.memory;
        u.0.disk += needs.disk;
        u.1 += 1;
    }
    #[derive(Serialize)]
    struct HostView<'a> {
        #[serde(flatten)]
        host: &'a HostRecord,
        used: Needs,
        members: usize,
    }
    let views: Vec<HostView> = hosts
        .iter()
        .map(|h| {
            let (u, n) = used.get(&h.inventory.name).copied().unwrap_or_default();
            HostView {
                host: h,
                used: u,
                members: n,
            }
        })
        .collect();
    if out.is_json() {
        out.json_only(&views);
        return Ok(0);
    }
    if views.is_empty() {
        println!("no hosts have joined (start droverd with --cluster ETCD_URLS)");
        return Ok(0);
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header([
        "HOST",
        "STATUS",
        "SITE",
        "CPUS USED/ALL",
        "MEMORY USED/ALL",
        "MEMBERS",
        "SECURITY",
        "COST vCPU/h",
    ]);
    for v in &views {
        let inv = &v.host.inventory;
        t.add_row([
            inv.name.clone(),
            v.host.status.to_string(),
            if inv.site.is_empty() {
                "-".into()
            } else {
                inv.site.clone()
            },
            format!("{}/{}", v.used.cpus, inv.cpus),
            format!("{}/{}", fmt_bytes(v.used.memory), fmt_bytes(inv.memory)),
            v.members.to_string(),
            inv.security_level.to_string(),
            format!("{:.3}", inv.cost.vcpu_hour),
        ]);
    }
    println!("{t}");
    Ok(0)
}

fn usage_row(name: String, u: &drover_cluster::usage::Usage) -> [String; 5] {
    [
        name,
        format!("{:.2}", u.vm_seconds / 3600.0),
        format!("{:.2}", u.vcpu_seconds / 3600.0),
        format!("{:.2}", u.gib_seconds / 3600.0),
        format!("{:.4}", u.cost),
    ]
}

/// `drover host drain|undrain NAME`.
pub async fn host_drain(name: &str, drain: bool, args: EtcdArgs, out: &Out) -> anyhow::Result<u8> {
    let etcd = connect(&args).await?;
    if !etcd.hosts().await?.iter().any(|h| h.inventory.name == name) {
        bail!("no host {name} in the cluster (see `drover host list`)");
    }
    etcd.set_draining(name, drain).await?;
    out.json_only(&serde_json::json!({"host": name, "draining": drain}));
    out.line(&if drain {
        format!("host {name} is draining: it takes no new members and its stateless members move to other hosts; `drover host list` and `drover service show` follow it")
    } else {
        format!("host {name} takes members again")
    });
    Ok(0)
}

/// Run a `drover cluster` command.
pub async fn cluster_cmd(cmd: ClusterCmd, out: &Out) -> anyhow::Result<u8> {
    match cmd {
        ClusterCmd::Usage { by, service, etcd } => {
            let etcd = connect(&etcd).await?;
            let rows: Vec<_> = etcd
                .usage()
                .await?
                .into_iter()
                .filter(|(k, _)| service.as_ref().is_none_or(|s| k.service == *s))
                .collect();
            let report = drover_cluster::usage::report(&rows, by.into());
            if out.is_json() {
                let rows: Vec<_> = report
                    .iter()
                    .map(|(k, u)| {
                        serde_json::json!({
                            "service": (!k.service.is_empty()).then_some(&k.service),
                            "app": (!k.app.is_empty()).then_some(&k.app),
                            "host": (!k.host.is_empty()).then_some(&k.host),
                            "vm_hours": u.vm_seconds / 3600.0,
                            "vcpu_hours": u.vcpu_seconds / 3600.0,
                            "gib_hours": u.gib_seconds / 3600.0,
                            "cost": u.cost,
                            "since_ms": u.since_ms,
                        })
                    })
                    .collect();
                out.json_only(&rows);
            } else if report.is_empty() {
                println!("no usage counted yet (the leading controller counts running members)");
            } else {
                let mut t = Table::new();
                t.load_preset(NOTHING);
                let first = match by {
                    UsageBy::Service => "SERVICE",
                    UsageBy::App => "SERVICE/APP",
                    UsageBy::Host => "HOST",
                };
                t.set_header([first, "VM-HOURS", "VCPU-HOURS", "GIB-HOURS", "COST"]);
                let mut total = drover_cluster::usage::Usage::default();
                for (k, u) in &report {
                    let name = match by {
                        UsageBy::Service => k.service.clone(),
                        UsageBy::App => format!("{}/{}", k.service, k.app),
                        UsageBy::Host => k.host.clone(),
                    };
                    t.add_row(usage_row(name, u));
                    total.add(u);
                }
                if report.len() > 1 {
                    t.add_row(usage_row("total".into(), &total));
                }
                println!("{t}");
            }
        }
        ClusterCmd::Use { endpoints } => {
            let path = cluster_file()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let text = toml::to_string(&ClusterFile {
                etcd: endpoints.clone(),
            })?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            out.json_only(&serde_json::json!({"etcd": endpoints}));
            out.line(&format!(
                "cluster commands now use etcd at {}",
                endpoints.join(",")
            ));
        }
        ClusterCmd::Status { etcd } => {
            let etcd = connect(&etcd).await?;
            let hosts = etcd.hosts().await?;
            let leader = etcd.leader().await?;
            let services = etcd.services().await?.len();
            let count =
                |s: drover_cluster::HostStatus| hosts.iter().filter(|h| h.status == s).count();
            let (up, down, draining) = (
                count(drover_cluster::HostStatus::Up),
                count(drover_cluster::HostStatus::Down),
                count(drover_cluster::HostStatus::Draining),
            );
            if out.is_json() {
                out.json_only(&serde_json::json!({
                    "etcd": "reachable", "leader": leader, "services": services,
                    "hosts": {"up": up, "down": down, "draining": draining},
                }));
            } else {
                println!("etcd: reachable");
                match &leader {
                    Some(l) => println!("leading controller: {l}"),
                    None => println!("leading controller: none (start drover-controller; nothing is placed or supervised meanwhile)"),
                }
                println!("hosts: {up} up, {draining} draining, {down} down");
                println!("services: {services}");
            }
            if leader.is_none() {
                return Ok(4);
            }
        }
    }
    Ok(0)
}
