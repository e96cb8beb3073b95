//! Service specs: a TOML file listing applications (VM templates) with replicas, needs, start
//! order and placement constraints, parsed strictly and validated before anything is applied.
//!
//! Invariants of a [`Service`]: names are DNS labels, every `after` names an app of the same
//! service, the start order has no cycle (apps are kept in a start order), and no app carries a
//! constraint that no cluster could satisfy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use drover_model::{format_size, parse_size};
use serde::{Deserialize, Serialize};

use crate::inventory::Needs;

/// Most replicas one app may ask for.
pub const MAX_REPLICAS: u32 = 1000;
/// Most apps in one service.
pub const MAX_APPS: usize = 100;
/// Largest service file read.
pub const MAX_SERVICE_FILE: usize = 256 * 1024;

/// The example service of the README and the issue: a db, then two web members kept apart.
pub const SHOP_EXAMPLE: &str = r#"name = "shop"
[[app]]
name = "db"
cpus = 1
memory = "256M"
[[app]]
name = "web"
cpus = 1
memory = "256M"
replicas = 2
after = ["db"]
anti_affinity = "host"
"#;

/// True for a DNS label: 1-63 characters a-z, 0-9 and '-', starting with a letter or digit and
/// not ending with '-'.
pub fn valid_label(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 63
        && !s.ends_with('-')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// How the scheduler ranks the hosts that fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fill the fullest host that fits first (fewer hosts in use).
    #[default]
    Binpack,
    /// Use the emptiest host first (members spread over hosts).
    Spread,
    /// The host where the member costs least per hour.
    Cheapest,
}

/// What anti-affinity keeps apart: members of one app on different hosts, or different sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// No two members of the app on one host.
    Host,
    /// No two members of the app in one site.
    Site,
}

/// Where a member's disks live, which decides what happens when its host is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// Nothing to keep: recreated from the template anywhere.
    #[default]
    Stateless,
    /// Disks on storage every host reaches: restarted from its disk elsewhere.
    Shared,
    /// Disks on its host only: waits for that host.
    Local,
}

/// A scale-out rule: add replicas while a metric is over a threshold ([`crate::scale`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRule {
    /// The metric: `cpu`, the share of its vCPUs a member's QEMU used between two rounds.
    pub metric: String,
    /// Add a replica while the metric's average over the members is above this; remove one
    /// once it stayed below half of it for two minutes.
    pub threshold: f64,
    /// Never more replicas than this.
    pub max_replicas: u32,
}

/// One `[[app]]` entry as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    name: String,
    #[serde(default)]
    image: Option<String>,
    cpus: u32,
    memory: String,
    #[serde(default)]
    disk: Option<String>,
    #[serde(default)]
    bandwidth_mbps: u32,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    after: Vec<String>,
    /// `ready = "CMD"`: run through the agent until it exits 0 (`ready_command` is the old name).
    #[serde(default, alias = "ready_command")]
    ready: Option<String>,
    #[serde(default)]
    anti_affinity: Option<Scope>,
    #[serde(default)]
    pin_host: Option<String>,
    #[serde(default)]
    pin_label: Option<String>,
    #[serde(default)]
    relocatable: Option<bool>,
    #[serde(default)]
    storage: Storage,
    #[serde(default)]
    min_security: u8,
    #[serde(default)]
    max_cost_per_hour: Option<f64>,
    #[serde(default)]
    strategy: Option<Strategy>,
    #[serde(default)]
    scale: Option<ScaleRule>,
}

/// A service file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: String,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default, rename = "app")]
    apps: Vec<AppFile>,
}

/// Hard placement rules of an app.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// Members of the app kept apart by host or site.
    pub anti_affinity: Option<Scope>,
    /// Only this host.
    pub pin_host: Option<String>,
    /// Only hosts with this label (`key`, `value`).
    pub pin_label: Option<(String, String)>,
    /// Only hosts at least this trusted.
    pub min_security: u8,
    /// Only hosts where one member costs at most this per hour.
    pub max_cost_per_hour: Option<f64>,
}

/// A validated application: a VM template and how many of it to run where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    /// The app's name, unique in its service.
    pub name: String,
    /// The guest image to boot; `None` for the host's default image.
    pub image: Option<String>,
    /// What one member needs.
    pub needs: Needs,
    /// How many members.
    pub replicas: u32,
    /// Apps whose members must all be running and ready before this app's members start.
    pub after: Vec<String>,
    /// A command run through the agent that must succeed before a member counts as ready.
    pub ready_command: Option<String>,
    /// Hard placement rules.
    pub constraints: Constraints,
    /// May a member be moved to another host (re-placed after repeated failures or a lost host)?
    pub relocatable: bool,
    /// Where its disks live.
    pub storage: Storage,
    /// How its hosts are ranked.
    pub strategy: Strategy,
    /// The scale-out rule, if any.
    pub scale: Option<ScaleRule>,
}

/// A validated service; apps are in start order (every app after the apps it waits for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The service's name, unique in the cluster.
    pub name: String,
    /// Its apps in start order.
    pub apps: Vec<App>,
}

/// One member of a service: app `web`, index 1 is `web-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MemberId {
    /// The service.
    pub service: String,
    /// The app.
    pub app: String,
    /// 1-based replica index.
    pub index: u32,
}

impl MemberId {
    /// The member's name within its service (`web-1`).
    pub fn short(&self) -> String {
        format!("{}-{}", self.app, self.index)
    }
    /// The name of the member's VM on its host (`shop-web-1`).
    pub fn vm_name(&self) -> String {
        format!("{}-{}-{}", self.service, self.app, self.index)
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}-{}", self.service, self.app, self.index)
    }
}

/// Why a service file was refused. Nothing of a refused file is applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ServiceError {
    /// The file is not valid TOML, or has unknown keys or wrong types.
    #[error("service file: {0}")]
    Toml(String),
    /// The file is larger than any service needs.
    #[error("service file is {0} bytes; the limit is {MAX_SERVICE_FILE}")]
    TooLarge(usize),
    /// A service or app name breaks the naming rule.
    #[error(
        "invalid name {0:?}: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit"
    )]
    BadName(String),
    /// The service lists no apps.
    #[error("service {0}: it has no [[app]]; add at least one")]
    NoApps(String),
    /// Too many apps.
    #[error("service {0}: more than {MAX_APPS} apps")]
    TooManyApps(String),
    /// Two apps share a name.
    #[error("service {service}: two apps are named {app:?}")]
    DuplicateApp {
        /// The service.
        service: String,
        /// The repeated name.
        app: String,
    },
    /// `after` names an app the service does not have.
    #[error(
        "app {app}: after = [{after:?}] names no app of service {service} (its apps: {known})"
    )]
    UnknownApp {
        /// The service.
        service: String,
        /// The app with the bad `after`.
        app: String,
        /// The unknown name.
        after: String,
        /// The apps there are.
        known: String,
    },
    /// The start order loops.
    #[error("service {service}: the start order has a cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The service.
        service: String,
        /// The apps on the cycle, the first repeated at the end.
        cycle: Vec<String>,
    },
    /// A value out of range or constraints no cluster can satisfy.
    #[error("app {app}: {reason}")]
    Impossible {
        /// The app.
        app: String,
        /// What cannot be.
        reason: String,
    },
}

impl Service {
    /// Parse and validate a service file.
    pub fn from_toml(text: &str) -> Result<Service, ServiceError> {
        if text.len() > MAX_SERVICE_FILE {
            return Err(ServiceError::TooLarge(text.len()));
        }
        let file: ServiceFile = toml::from_str(text)
            .map_err(|e| ServiceError::Toml(e.to_string().trim().to_string()))?;
        validate(file)
    }

    /// The app with this name.
    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// Every member the service wants, in start order.
    pub fn members(&self) -> impl Iterator<Item = (MemberId, &App)> + '_ {
        self.apps.iter().flat_map(move |app| {
            (1..=app.replicas).map(move |index| {
                (
                    MemberId {
                        service: self.name.clone(),
                        app: app.name.clone(),
                        index,
                    },
                    app,
                )
            })
        })
    }
}

/// The app a member belongs to, among these services.
pub fn app_of<'a>(services: &'a [Service], member: &MemberId) -> Option<&'a App> {
    services
        .iter()
        .find(|s| s.name == member.service)
        .and_then(|s| s.app(&member.app))
}

fn impossible(app: &str, reason: impl Into<String>) -> ServiceError {
    ServiceError::Impossible {
        app: app.to_string(),
        reason: reason.into(),
    }
}

fn validate(file: ServiceFile) -> Result<Service, ServiceError> {
    if !valid_label(&file.name) {
        return Err(ServiceError::BadName(file.name));
    }
    if file.apps.is_empty() {
        return Err(ServiceError::NoApps(file.name));
    }
    if file.apps.len() > MAX_APPS {
        return Err(ServiceError::TooManyApps(file.name));
    }
    let mut names = BTreeSet::new();
    for app in &file.apps {
        if !valid_label(&app.name) {
            return Err(ServiceError::BadName(app.name.clone()));
        }
        if !names.insert(app.name.as_str()) {
            return Err(ServiceError::DuplicateApp {
                service: file.name.clone(),
                app: app.name.clone(),
            });
        }
    }
    let known = names.iter().copied().collect::<Vec<_>>().join(", ");
    let mut apps = Vec::with_capacity(file.apps.len());
    for a in &file.apps {
        for after in &a.after {
            if !names.contains(after.as_str()) {
                return Err(ServiceError::UnknownApp {
                    service: file.name.clone(),
                    app: a.name.clone(),
                    after: after.clone(),
                    known,
                });
            }
        }
        apps.push(validate_app(&file, a)?);
    }
    let apps = start_order(&file.name, apps)?;
    Ok(Service {
        name: file.name,
        apps,
    })
}

fn validate_app(file: &ServiceFile, a: &AppFile) -> Result<App, ServiceError> {
    let name = &a.name;
    let size = |field: &str, text: &str| {
        parse_size(text).map_err(|e| impossible(name, format!("{field}: {e}")))
    };
    if a.cpus == 0 || a.cpus > 1024 {
        return Err(impossible(
            name,
            format!("cpus = {}: must be 1-1024", a.cpus),
        ));
    }
    let memory = size("memory", &a.memory)?;
    if memory < (16 << 20) || memory % (1 << 20) != 0 {
        return Err(impossible(
            name,
            format!(
                "memory = {:?}: must be a whole number of MiB, at least 16M",
                a.memory
            ),
        ));
    }
    let disk = match &a.disk {
        Some(d) => size("disk", d)?,
        None => 0,
    };
    let replicas = a.replicas.unwrap_or(1);
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(impossible(
            name,
            format!("replicas = {replicas}: must be 1-{MAX_REPLICAS}"),
        ));
    }
    if a.after.iter().any(|x| x == name) {
        return Err(ServiceError::Cycle {
            service: file.name.clone(),
            cycle: vec![name.clone(), name.clone()],
        });
    }
    if let Some(host) = &a.pin_host {
        if !valid_label(host) {
            return Err(ServiceError::BadName(host.clone()));
        }
        if a.anti_affinity.is_some() && replicas > 1 {
            return Err(impossible(
                name,
                format!(
                    "pin_host = {host:?} with anti_affinity and {replicas} replicas: one host cannot hold members kept apart"
                ),
            ));
        }
    }
    let pin_label = match &a.pin_label {
        None => None,
        Some(l) => match l.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Some((k.to_string(), v.to_string())),
            _ => {
                return Err(impossible(
                    name,
                    format!("pin_label = {l:?}: write it as key=value (pin_label = \"ssd=yes\")"),
                ))
            }
        },
    };
    if let Some(max) = a.max_cost_per_hour {
        if !max.is_finite() || max < 0.0 {
            return Err(impossible(
                name,
                format!("max_cost_per_hour = {max}: must be a number >= 0"),
            ));
        }
    }
    let relocatable = match (a.relocatable, a.storage) {
        (Some(true), Storage::Local) => {
            return Err(impossible(
                name,
                "relocatable = true with storage = \"local\": a member with local disks can only run on its host",
            ))
        }
        (Some(r), _) => r,
        (None, s) => s != Storage::Local,
    };
    if let Some(rule) = &a.scale {
        if rule.max_replicas < replicas || rule.max_replicas > MAX_REPLICAS {
            return Err(impossible(
                name,
                format!(
                    "scale.max_replicas = {}: must be between replicas ({replicas}) and {MAX_REPLICAS}",
                    rule.max_replicas
                ),
            ));
        }
        if !crate::scale::METRICS.contains(&rule.metric.as_str()) {
            return Err(impossible(
                name,
                format!(
                    "scale.metric = {:?}: the controller measures only {}",
                    rule.metric,
                    crate::scale::METRICS.join(", ")
                ),
            ));
        }
        if !rule.threshold.is_finite() || rule.threshold <= 0.0 || rule.threshold > 1.0 {
            return Err(impossible(
                name,
                format!(
                    "scale.threshold = {}: give the share of the members' vCPUs (0 < t <= 1, e.g. 0.8)",
                    rule.threshold
                ),
            ));
        }
    }
    if let Some(cmd) = &a.ready {
        if cmd.trim().is_empty() || cmd.len() > 4096 {
            return Err(impossible(
                name,
                "ready: the command must be 1-4096 characters",
            ));
        }
    }
    // The VM name on the host is `service-app-index`; it must stay a DNS label.
    let longest = format!("{}-{}-{}", file.name, name, replicas);
    if longest.len() > 63 {
        return Err(impossible(
            name,
            format!("member VM name {longest:?} is longer than 63 characters; shorten the service or app name"),
        ));
    }
    Ok(App {
        name: name.clone(),
        image: a.image.clone(),
        needs: Needs {
            cpus: a.cpus,
            memory,
            disk,
            bandwidth_mbps: a.bandwidth_mbps,
        },
        replicas,
        after: a.after.clone(),
        ready_command: a.ready.clone(),
        constraints: Constraints {
            anti_affinity: a.anti_affinity,
            pin_host: a.pin_host.clone(),
            pin_label,
            min_security: a.min_security,
            max_cost_per_hour: a.max_cost_per_hour,
        },
        relocatable,
        storage: a.storage,
        strategy: a.strategy.unwrap_or(file.strategy),
        scale: a.scale.clone(),
    })
}

/// Order apps so each comes after the apps it waits for (stable: file order among equals);
/// a cycle is an error naming it.
fn start_order(service: &str, apps: Vec<App>) -> Result<Vec<App>, ServiceError> {
    let index: BTreeMap<&str, usize> = apps
        .iter()
        .enumerate()
        .map(|(i, a)| (a.name.as_str(), i))
        .collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut mark = vec![0u8; apps.len()];
    let mut order = Vec::with_capacity(apps.len());
    fn visit(
        i: usize,
        apps: &[App],
        index: &BTreeMap<&str, usize>,
        mark: &mut [u8],
        path: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), Vec<String>> {
        match mark[i] {
            2 => return Ok(()),
            1 => {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle: Vec<String> =
                    path[from..].iter().map(|&p| apps[p].name.clone()).collect();
                cycle.push(apps[i].name.clone());
                return Err(cycle);
            }
            _ => {}
        }
        mark[i] = 1;
        path.push(i);
        for dep in &apps[i].after {
            if let Some(&d) = index.get(dep.as_str()) {
                visit(d, apps, index, mark, path, order)?;
            }
        }
        path.pop();
        mark[i] = 2;
        order.push(i);
        Ok(())
    }
    for i in 0..apps.len() {
        visit(i, &apps, &index, &mut mark, &mut Vec::new(), &mut order).map_err(|cycle| {
            ServiceError::Cycle {
                service: service.to_string(),
                cycle,
            }
        })?;
    }
    let mut slots: Vec<Option<App>> = apps.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Memory in MiB, rounded up, for messages ("short by 512 MiB").
pub fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// A size for tables (`256M`).
pub fn size(bytes: u64) -> String {
    format_size(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shop_file_parses_as_written() {
        let s = Service::from_toml(SHOP_EXAMPLE).unwrap();
        assert_eq!(s.name, "shop");
        let names: Vec<String> = s.members().map(|(m, _)| m.to_string()).collect();
        assert_eq!(names, ["shop/db-1", "shop/web-1", "shop/web-2"]);
        let web = s.app("web").unwrap();
        assert_eq!(web.needs.memory, 256 << 20);
        assert_eq!(web.constraints.anti_affinity, Some(Scope::Host));
        assert_eq!(web.after, ["db"]);
        assert!(web.relocatable);
        assert_eq!(web.strategy, Strategy::Binpack);
    }

    #[test]
    fn apps_come_in_start_order_whatever_the_file_order() {
        let text = r#"
name = "s"
[[app]]
name = "web"
cpus = 1
memory = "64M"
after = ["api"]
[[app]]
name = "api"
cpus = 1
memory = "64M"
after = ["db"]
[[app]]
name = "db"
cpus = 1
memory = "64M"
"#;
        let s = Service::from_toml(text).unwrap();
        let order: Vec<&str> = s.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(order, ["db", "api", "web"]);
    }

    fn err(text: &str) -> String {
        Service::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_files_are_refused_with_what_to_fix() {
        let base = "name = \"s\"\n[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"64M\"\n";
        assert!(err(&format!("{base}colour = \"red\"\n")).contains("unknown field `colour`"));
        assert!(err("name = \"s\"\nfoo = 1\n").contains("unknown field `foo`"));
        assert!(err(&format!("{base}after = [\"b\"]\n"))
            .contains("names no app of service s (its apps: a)"));
        assert_eq!(
            err(&format!("{base}after = [\"b\"]\n[[app]]\nname = \"b\"\ncpus = 1\nmemory = \"64M\"\nafter = [\"a\"]\n")),
            "service s: the start order has a cycle: a -> b -> a"
        );
        assert!(err(&format!("{base}after = [\"a\"]\n")).contains("cycle: a -> a"));
        assert!(err(&format!("{base}replicas = 0\n")).contains("replicas = 0"));
        assert!(err(&format!(
            "{base}replicas = 3\nanti_affinity = \"host\"\npin_host = \"h1\"\n"
        ))
        .contains("one host cannot hold members kept apart"));
        assert!(err(&format!("{base}pin_label = \"ssd\"\n")).contains("key=value"));
        assert!(
            err(&format!("{base}storage = \"local\"\nrelocatable = true\n"))
                .contains("local disks")
        );
        assert!(
            err(&format!("{base}anti_affinity = \"rack\"\n")).contains("unknown variant `rack`")
        );
        assert!(err(&format!("{base}max_cost_per_hour = -1.0\n")).contains("must be a number >= 0"));
        assert!(err(&format!(
            "{base}[app.scale]\nmetric = \"cpu\"\nthreshold = 0.8\nmax_replicas = 0\n"
        ))
        .contains("scale.max_replicas"));
        assert!(err(&format!(
            "{base}[app.scale]\nmetric = \"queue\"\nthreshold = 0.8\nmax_replicas = 3\n"
        ))
        .contains("measures only cpu"));
        assert!(err(&format!(
            "{base}[app.scale]\nmetric = \"cpu\"\nthreshold = 80\nmax_replicas = 3\n"
        ))
        .contains("share of the members' vCPUs"));
        assert!(err("name = \"s\"\n").contains("has no [[app]]"));
        assert!(err("name = \"S\"\n").contains("invalid name"));
        assert!(err(&format!(
            "{base}[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"64M\"\n"
        ))
        .contains("two apps are named"));
        assert!(err(&format!("{base}memory = \"1.5G\"\n")).contains("duplicate key"));
    }

    #[test]
    fn local_storage_is_not_relocatable_by_default() {
        let s = Service::from_toml("name = \"s\"\n[[app]]\nname = \"a\"\ncpus = 1\nmemory = \"64M\"\nstorage = \"local\"\n").unwrap();
        assert!(!s.apps[0].relocatable);
    }
}
