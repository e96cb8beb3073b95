//! Everything the CLI prints: tables for people, JSON for scripts, spinners for slow steps.

use comfy_table::{presets::NOTHING, Table};
use drover_api::{HostInfo, ImageInfo, VmInfo, VmState};
use drover_model::{format_size, Boot, NicBackend};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Duration;

/// The output mode and its printers.
pub struct Out {
    /// Structured output for scripts (JSON, or YAML with `yaml`) instead of tables.
    json: bool,
    yaml: bool,
}

/// A spinner on stderr while a slow step runs (plain lines when stderr is not a terminal).
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// Show the current step.
    pub fn set(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None if !self.quiet => eprintln!("  {msg}"),
            None => {}
        }
    }
    /// Whether a spinner shows the steps (else each step is a line of its own).
    pub fn is_live(&self) -> bool {
        self.bar.is_some()
    }
    /// Finish with a summary line (on stderr, so stdout stays clean for data).
    pub fn done(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.finish_with_message(format!("✓ {msg}")),
            None if !self.quiet => eprintln!("{msg}"),
            None => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

fn age(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

impl Out {
    /// Printers for the chosen mode.
    pub fn new(json: bool, yaml: bool) -> Self {
        Out {
            json: json || yaml,
            yaml,
        }
    }

    /// The structured form of a value: JSON, or YAML when asked for.
    fn print_json<T: Serialize>(&self, v: &T) {
        let text = if self.yaml {
            serde_yaml_ng::to_string(v).map_err(|e| e.to_string())
        } else {
            serde_json::to_string_pretty(v).map_err(|e| e.to_string())
        };
        match text {
            Ok(s) => println!("{}", s.trim_end()),
            Err(e) => eprintln!("drover: cannot encode output: {e}"),
        }
    }

    /// A spinner for a slow step.
    pub fn progress(&self, msg: &str) -> Progress {
        if self.json || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                quiet: self.json,
            };
        }
        let bar = ProgressBar::new_spinner();
        let template = if crate::conventions::no_color() {
            "{spinner} {msg} {elapsed}"
        } else {
            "{spinner} {msg} {elapsed:.dim}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress {
            bar: Some(bar),
            quiet: false,
        }
    }

    /// An error: one line for people, an object for scripts.
    pub fn error(&self, e: &anyhow::Error) {
        if self.json {
            let code = e
                .downcast_ref::<drover_api::ClientError>()
                .and_then(|c| c.code())
                .map(|c| serde_json::to_value(c).unwrap_or_default())
                .unwrap_or(serde_json::Value::String("error".into()));
            self.print_json(
                &serde_json::json!({"error": {"code": code, "message": e.to_string()}}),
            );
        } else {
            eprintln!("drover: {e}");
        }
    }

    /// A line for people only.
    pub fn line(&self, s: &str) {
        if !self.json {
            println!("{s}");
        }
    }

    /// A value for scripts only.
    pub fn json_only<T: Serialize>(&self, v: &T) {
        if self.json {
            self.print_json(v);
        }
    }

    /// `drover vm list`.
    pub fn vm_list(&self, vms: &[VmInfo]) {
        if self.json {
            return self.print_json(&vms);
        }
        if vms.is_empty() {
            println!("no VMs (create one with `drover vm create NAME`)");
            return;
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header([
            "NAME",
            "STATE",
            "CPUS",
            "MEMORY",
            "DISKS",
            "NICS",
            "PID",
            "AGENT",
            "UPTIME / LAST EXIT",
        ]);
        for v in vms {
            let agent = match &v.agent {
                Some(a) if a.ready => "ready",
                Some(a) if a.connected => "booting",
                Some(_) => "-",
                None => "",
            };
            let when = match (v.state, v.started_at_ms, &v.last_exit) {
                (VmState::Running, Some(ms), _) => age(ms),
                (VmState::Stopped, _, Some(e)) => format!("{} {} ago", e.reason, age(e.at_ms)),
                (VmState::Paused, _, _) => v.paused_reason.clone().unwrap_or_default(),
                _ => String::new(),
            };
            let c = v.running_config.as_ref().unwrap_or(&v.config);
            t.add_row([
                v.name.clone(),
                v.state.to_string(),
                c.cpus.to_string(),
                format_size(c.memory),
                c.disks.len().to_string(),
                c.nics.len().to_string(),
                v.pid.map(|p| p.to_string()).unwrap_or_default(),
                agent.to_string(),
                when,
            ]);
        }
        println!("{t}");
    }

    /// `drover vm create`.
    pub fn created(&self, v: &VmInfo) {
        if self.json {
            return self.print_json(v);
        }
        println!("created VM {} ({} vCPU, {}, {} disk(s), {} NIC(s)); start it with `drover vm start {} --wait`",
            v.name, v.config.cpus, format_size(v.config.memory), v.config.disks.len(), v.config.nics.len(), v.name);
    }

    /// `drover vm show`.
    pub fn vm(&self, v: &VmInfo) {
        if self.json {
            return self.print_json(v);
        }
        let c = v.running_config.as_ref().unwrap_or(&v.config);
        println!("name:      {}", v.name);
        match &v.paused_reason {
            Some(why) if v.state == VmState::Paused => {
                println!("state:     {} ({why})", v.state)
            }
            _ => match &v.hibernation {
                Some(h) if v.state == VmState::Hibernated => println!(
                    "state:     hibernated {} ago in state {} ({} in {}; `drover vm resume {}`)",
                    age(h.at_ms),
                    h.state,
                    format_size(h.bytes),
                    h.dir.display(),
                    v.name
                ),
                _ => println!("state:     {}", v.state),
            },
        }
        if let Some(pid) = v.pid {
            println!("pid:       {pid}");
        }
        if let Some(a) = v.accel {
            println!("accel:     {a}");
        }
        if let Some(ms) = v.started_at_ms {
            println!("uptime:    {}", age(ms));
        }
        println!("created:   {} ago", age(v.created_at_ms));
        if let Some(c) = &v.clone_of {
            println!(
                "clone of:  state {} of {}, {} ago; machine-id {}{}",
                c.state,
                c.vm,
                age(c.at_ms),
                c.machine_id,
                if c.identity_applied_ms.is_some() {
                    ""
                } else {
                    " (not confirmed by its agent yet)"
                }
            );
        }
        let p = &v.platform;
        println!(
            "machine:   {}, cpu {}{}{}",
            p.machine_arg(),
            p.cpu_arg(),
            if p.ram_pad { ", RAM padded" } else { "" },
            if p.is_pinned() {
                ""
            } else {
                " (not pinned: created before Drover recorded versioned machines)"
            }
        );
        if let Some(m) = &v.migration {
            use drover_api::{MigrationPhase as P, MigrationRole as R};
            println!(
                "migration: {}",
                match (m.role, m.phase) {
                    (R::Incoming, P::Committed) => format!("arrived from {} ({})", m.peer, m.id),
                    (R::Incoming, _) => format!("arriving from {} ({})", m.peer, m.id),
                    (R::Outgoing, P::Copying) => format!("being copied to {} ({})", m.peer, m.id),
                    (R::Outgoing, _) => format!(
                        "handed over to {}, waiting for its answer; paused here ({})",
                        m.peer, m.id
                    ),
                }
            );
        }
        if let Some(from) = &v.started_from {
            println!(
                "config:    {from}{}",
                if v.next_config.is_some() {
                    " (+ changes for the next boot)"
                } else {
                    ""
                }
            );
        }
        println!(
            "persist:   {} (mode {})",
            if v.persist { "on" } else { "off" },
            v.persist_mode
        );
        println!("vcpus:     {}", c.cpus);
        println!("memory:    {}", format_size(c.memory));
        match &c.boot {
            Boot::Default { cmdline } => println!(
                "boot:      default guest image{}",
                cmdline
                    .as_ref()
                    .map(|c| format!(" (+ {c})"))
                    .unwrap_or_default()
            ),
            Boot::Kernel { kernel, .. } => println!("boot:      kernel {}", kernel.display()),
            Boot::Disk { disk } => println!("boot:      disk {disk}"),
        }
        for d in &c.disks {
            let owner = match v.unwritten.get(d.id.as_str()) {
                _ if d.owned => d
                    .base
                    .as_ref()
                    .map(|b| format!(" (a thin copy of image {b})"))
                    .unwrap_or_default(),
                Some(layer) => format!(
                    " (yours, kept on delete; its latest data is in {} since a save, written back into it on delete)",
                    layer.display()
                ),
                None => " (yours, kept on delete)".to_string(),
            };
            println!(
                "disk:      {} {} {} {}{}{}{owner}",
                d.id,
                format_size(d.size),
                d.format,
                d.path.display(),
                if d.readonly { " read-only" } else { "" },
                pci_place(d.slot, d.addr),
            );
        }
        for n in &c.nics {
            let backend = match &n.backend {
                NicBackend::User { forwards } if forwards.is_empty() => "user".to_string(),
                NicBackend::User { forwards } => format!(
                    "user, forwards {}",
                    forwards
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                NicBackend::Tap { ifname } => format!("tap {ifname}"),
            };
            println!(
                "nic:       {} {} {backend}{}",
                n.id,
                n.mac,
                pci_place(n.slot, n.addr)
            );
        }
        if let Some(a) = &v.agent {
            match &a.info {
                Some(i) if a.ready => println!(
                    "agent:     ready (version {}, guest uptime {}s at hello{})",
                    i.agent_version,
                    i.uptime_ms / 1000,
                    a.ready_after_ms
                        .map(|m| format!(", ready {:.2}s after start", m as f64 / 1000.0))
                        .unwrap_or_default()
                ),
                _ if a.none_seen => println!(
                    "agent:     none seen (nothing in the guest opened the request port; exec, guest saves and scans need drover-agent)"
                ),
                _ if a.guest_opened => println!("agent:     starting (the guest opened its port, no hello yet)"),
                _ if a.connected => println!("agent:     not seen yet (guest booting)"),
                _ => println!("agent:     not connected"),
            }
        }
        if let Some(e) = &v.last_exit {
            println!(
                "last exit: {} {} ago{}",
                e.reason,
                age(e.at_ms),
                e.detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }

    /// `drover host info`.
    pub fn host(&self, h: &HostInfo) {
        if self.json {
            return self.print_json(h);
        }
        println!("host:         {}", h.hostname);
        if let Some(id) = &h.identity {
            println!("host id:      {}", id.id);
            println!("serial:       {}", id.serial);
            println!("model:        {}", id.model);
        }
        println!("droverd:      {}", h.daemon_version);
        println!("accelerator:  {} ({})", h.accel, h.accel_reason);
        println!("qemu:         {} ({})", h.qemu_version, h.qemu_binary);
        if let Some(q) = &h.qemu {
            if let Some(dir) = &q.dir {
                println!("qemu dir:     {dir} (firmware {})", q.firmware_dir);
            }
            println!("qemu tools:   {}, {}", q.qemu_img, q.qemu_nbd);
            println!(
                "machines:     q35 = {}; {} q35 types back to {}",
                q.machine_aliases
                    .get("q35")
                    .map(String::as_str)
                    .unwrap_or("?"),
                q.machines.len(),
                q.machines.first().map(String::as_str).unwrap_or("?")
            );
            println!(
                "new VMs:      machine {}, cpu {}{}",
                q.new_vm_platform.machine_arg(),
                q.new_vm_platform.cpu_arg(),
                if q.new_vm_platform.ram_pad {
                    ", RAM padded"
                } else {
                    ""
                }
            );
            println!(
                "cpu models:   {} usable under {}",
                q.cpu_models.len(),
                h.accel
            );
            println!("migration:    {}", q.migration_capabilities.join(" "));
            println!(
                "qmp:          {} commands (probed in {} ms)",
                q.qmp_commands, q.probe_ms
            );
            for quirk in &q.quirks {
                println!("quirk:        {quirk}");
            }
        }
        println!("cpus:         {}", h.cpus);
        println!(
            "memory:       {} total, {} available, {} given to running VMs",
            fmt_bytes(h.memory_total),
            fmt_bytes(h.memory_available),
            fmt_bytes(h.memory_allocated)
        );
        println!(
            "disk:         {} free of {} ({})",
            fmt_bytes(h.disk_free),
            fmt_bytes(h.disk_total),
            h.state_dir
        );
        println!(
            "vms:          {} defined, {} running",
            h.vms_defined, h.vms_running
        );
    }

    /// `drover image show|build`.
    pub fn image(&self, i: &ImageInfo) {
        if self.json {
            return self.print_json(i);
        }
        let m = &i.manifest;
        let s = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
        let n = |k: &str| m.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!("image:    {}", i.dir);
        println!(
            "kernel:   {} ({}, {})",
            i.kernel,
            s("kernel_version"),
            fmt_bytes(n("kernel_bytes"))
        );
        println!("initrd:   {} ({})", i.initrd, fmt_bytes(n("initrd_bytes")));
        if let Some(disk) = &i.disk {
            println!("disk:     {disk} ({})", fmt_bytes(n("disk_bytes")));
            println!("cmdline:  {}", i.cmdline.as_deref().unwrap_or("?"));
            println!("distro:   {}", s("distro"));
            println!("kernel package: {}", s("kernel_package"));
            println!(
                "agent:    {} (sha256 {})",
                s("agent_deb"),
                s("agent_sha256").chars().take(16).collect::<String>()
            );
            if let Some(img) = &i.image {
                println!(
                    "imported: image {} (vm create --from-image {})",
                    img.name, img.name
                );
            }
            if let Some(note) = &i.note {
                eprintln!("note: {note}");
            }
            return;
        }
        println!(
            "size:     {} in all",
            fmt_bytes(n("kernel_bytes") + n("initrd_bytes"))
        );
        println!("busybox:  {}", s("busybox_version"));
        println!(
            "agent:    sha256 {}",
            s("agent_sha256").chars().take(16).collect::<String>()
        );
        if let Some(mods) = m.get("modules").and_then(|v| v.as_array()) {
            println!(
                "modules:  {}",
                mods.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }

    /// `drover vm exec`: the command's output, and its exit code for ours.
    pub fn exec(&self, r: &drover_proto::ExecResult) -> u8 {
        if self.json {
            self.print_json(r);
        } else {
            use std::io::Write;
            let _ = std::io::stdout().write_all(r.stdout.as_bytes());
            let _ = std::io::stderr().write_all(r.stderr.as_bytes());
            if r.stdout_truncated || r.stderr_truncated {
                eprintln!(
                    "drover: output was truncated at {} per stream",
                    fmt_bytes(drover_proto::MAX_EXEC_OUTPUT as u64)
                );
            }
            if r.timed_out {
                eprintln!("drover: the command timed out and was killed");
            }
        }
        if r.timed_out {
            return 124;
        }
        match (r.exit_code, r.signal) {
            (Some(c), _) => u8::try_from(c).unwrap_or(1),
            (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
            (None, None) => 1,
        }
    }
}

impl Out {
    /// A live or next-boot change.
    pub fn change(&self, r: &drover_api::ChangeResult) {
        if self.json {
            return self.print_json(r);
        }
        let how = match r.applied.as_str() {
            "live" => "applied live",
            "next-boot" => "recorded for the next boot",
            _ => "stored for the next start",
        };
        println!("{} {how}:", r.vm.name);
        for l in &r.changes {
            println!("  {l}");
        }
        if let Some(w) = &r.warning {
            eprintln!("note: {w}");
        }
    }

    /// `drover vm config list`.
    pub fn history(&self, h: &drover_api::ConfigHistoryView) {
        if self.json {
            return self.print_json(h);
        }
        println!(
            "{}: persistence {} (mode {}); a plain start boots generation {}",
            h.name,
            if h.persist { "on" } else { "off" },
            h.persist_mode,
            h.default_start
        );
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header(["GEN", "STORED", "BY", "KIND", "WHY", "CHANGES FROM INITIAL"]);
        for g in &h.generations {
            t.add_row([
                g.id.to_string(),
                format!("{} ago", age(g.created_at_ms)),
                g.who.clone(),
                g.kind.clone(),
                g.why.clone(),
                if g.changes.is_empty() {
                    "-".to_string()
                } else {
                    g.changes.join("; ")
                },
            ]);
        }
        println!("{t}");
    }

    /// One config.
    pub fn config(&self, c: &drover_model::VmConfig) {
        if self.json {
            return self.print_json(c);
        }
        for (key, el) in c.elements() {
            println!("{key:<16} {el}");
        }
    }

    /// Lines, or a note when there are none.
    pub fn lines(&self, lines: &[String], empty: &str) {
        if self.json {
            return self.print_json(&lines);
        }
        if lines.is_empty() {
            println!("{empty}");
        }
        for l in lines {
            println!("{l}");
        }
    }

    /// `drover vm config journal`.
    pub fn journal(&self, j: &[drover_api::JournalEntry]) {
        if self.json {
            return self.print_json(&j);
        }
        for e in j {
            println!("{} ago  {}  {}", age(e.at_ms), e.who, e.kind);
            for c in &e.changes {
                println!("    {c}");
            }
        }
    }

    /// `drover snapshot list`.
    pub fn states(&self, list: &[drover_api::StateInfo]) {
        if self.json {
            return self.print_json(&list);
        }
        if list.is_empty() {
            println!("no saved states (save one with `drover snapshot create VM`)");
            return;
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header([
            "ID",
            "NAME",
            "SAVED",
            "BY",
            "MODE",
            "PHASE",
            "PAUSED",
            "MEMORY",
            "DEVICE STATE",
        ]);
        for s in list {
            t.add_row([
                s.id.clone(),
                s.name.clone(),
                format!("{} ago", age(s.created_at_ms)),
                s.created_by.clone(),
                s.mode.clone(),
                s.phase.as_str().to_string(),
                format!("{} ms", s.paused_ms),
                s.memory
                    .as_ref()
                    .map(|m| fmt_bytes(m.bytes))
                    .unwrap_or_else(|| "in stream".into()),
                fmt_bytes(s.devices.bytes),
            ]);
        }
        println!("{t}");
    }

    /// `drover image list`.
    pub fn disk_images(&self, list: &[drover_api::DiskImage]) {
        if self.json {
            return self.print_json(&list);
        }
        if list.is_empty() {
            println!("no imported images (add one with `drover image import NAME FILE`)");
            return;
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header(["NAME", "SIZE", "ON DISK", "FROM", "IMPORTED", "USED BY"]);
        for i in list {
            t.add_row([
                i.name.clone(),
                fmt_bytes(i.virtual_size),
                fmt_bytes(i.bytes),
                format!("{} ({})", i.source, i.source_format),
                format!("{} ago", age(i.imported_at_ms)),
                if i.used_by.is_empty() {
                    "-".to_string()
                } else {
                    i.used_by.join(", ")
                },
            ]);
        }
        println!("{t}");
    }

    /// `drover snapshot check`.
    pub fn state_check(&self, r: &drover_api::StateCheck) {
        if self.json {
            return self.print_json(r);
        }
        let mut t = Table::new();
        t.load_preset(NOTHING);
        t.set_header(["WHAT", "SAVED", "TARGET", "VERDICT", "NOTE"]);
        for d in &r.differences {
            t.add_row([
                d.what.clone(),
                d.saved.clone(),
                d.target.clone(),
                d.verdict.to_string(),
                d.note.clone(),
            ]);
        }
        println!("{t}");
        if r.fits {
            println!("state {} of {} fits {}", r.state, r.vm, r.target);
        } else {
            println!(
                "state {} of {} cannot be restored on {}: see the blocking lines",
                r.state, r.vm, r.target
            );
        }
    }

    /// `drover snapshot show`.
    pub fn state(&self, s: &drover_api::StateInfo) {
        if self.json {
            return self.print_json(s);
        }
        println!(
            "state:    {} ({}) of {}, format {}",
            s.id, s.name, s.vm, s.format
        );
        println!(
            "saved:    {} ago by {}, {} save{}, VM paused {} ms",
            age(s.created_at_ms),
            s.created_by,
            s.mode,
            s.capture
                .map(|c| format!(" (memory by {c})"))
                .unwrap_or_default(),
            s.paused_ms
        );
        println!(
            "phase:    {}{}",
            s.phase.as_str(),
            match (s.phase, &s.failure) {
                (_, Some(why)) => format!(" ({why})"),
                (drover_api::StatePhase::Capturing, _) =>
                    " (memory still streaming; a restore waits for it)".to_string(),
                (drover_api::StatePhase::Ready, _) =>
                    " (complete in RAM; being written to disk)".to_string(),
                _ => String::new(),
            }
        );
        println!(
            "devices:  {} {} sha256 {}",
            s.devices.file,
            fmt_bytes(s.devices.bytes),
            s.devices.sha256.as_deref().unwrap_or("(pending)")
        );
        if let Some(m) = &s.memory {
            println!(
                "memory:   {} {} sha256 {}",
                m.file,
                fmt_bytes(m.bytes),
                m.sha256.as_deref().unwrap_or("(being computed)")
            );
        }
        for d in &s.config.disks {
            // The layer the state pins (format 2 on); older manifests named it in the config.
            let layer = s.layers.get(d.id.as_str()).unwrap_or(&d.path);
            println!("disk:     {} layer {}", d.id, layer.display());
        }
        println!(
            "shape:    {} vCPU, {}",
            s.config.cpus,
            format_size(s.config.memory)
        );
    }

    /// Whether output is JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// `drover vm guest-access list`.
    pub fn principals(&self, list: &[drover_api::GuestPrincipal]) {
        if self.json {
            return self.print_json(&list);
        }
        if list.is_empty() {
            println!("no guest principals: nothing inside the VM may ask the host for anything");
        }
        for p in list {
            println!(
                "{}: {} (granted by {} {} ago)",
                p.principal,
                p.ops.join(", "),
                p.created_by,
                age(p.created_at_ms)
            );
        }
    }

    /// `drover vm audit`.
    pub fn audit(&self, list: &[drover_api::AuditEntry]) {
        if self.json {
            return self.print_json(&list);
        }
        for e in list {
            println!(
                "{} ago  {:<10} {:<12} {:<10}{}{}{}",
                age(e.at_ms),
                e.principal,
                e.op,
                e.outcome,
                e.ticket
                    .as_ref()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default(),
                e.app_id
                    .as_ref()
                    .map(|a| format!(" app {a}"))
                    .unwrap_or_default(),
                e.detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }

    /// `drover auth list`.
    pub fn roles(&self, roles: &[(u32, String)]) {
        if self.json {
            return self.print_json(&roles);
        }
        println!("uid 0: admin (always)");
        for (uid, role) in roles {
            println!("uid {uid}: {role}");
        }
    }
}

/// Bytes in a readable unit (1.5G, 300M).
/// Bytes for people: `1.5G`, `300.0M`, `512B`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (size, unit) in UNITS {
        if b >= size {
            return format!("{:.1}{unit}", b as f64 / size as f64);
        }
    }
    format!("{b}B")
}

/// Where the guest finds a device: ` (pci 00:07.0)` on the root bus, ` (hot-plug port 0)`.
fn pci_place(slot: Option<u8>, addr: Option<u8>) -> String {
    match (slot, addr) {
        (Some(p), _) => format!(" (hot-plug port {p})"),
        (None, Some(a)) => format!(" (pci 00:{a:02x}.0)"),
        (None, None) => String::new(),
    }
}
