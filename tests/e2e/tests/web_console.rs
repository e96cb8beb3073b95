//! The web console in a real browser (Debian's chromium, driven through chromedriver), as an
//! operator and a viewer meet it: log in with a token, see a running VM, stop and start it from
//! the page and watch its state change without a reload, type into the guest's serial console
//! and read the shell's answer, save a state and restore it from the page; a viewer sees no stop button, and the API refuses it the stop.
//! One guest serves every step.
//!
//! `DROVER_SCREENSHOT_DIR=docs/screenshots` keeps the pages' screenshots (the README's).

use drover_e2e::{free_port, pids_mentioning, Daemon};
use fantoccini::{Client, Locator};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The browser and its driver (Debian's `chromium` and `chromium-driver`).
fn browser_bins() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("DROVER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let driver = std::env::var_os("DROVER_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    for b in [&chromium, &driver] {
        assert!(
            b.exists(),
            "{} is missing: install it with `scripts/install-deps.sh --tests` (Debian's chromium and chromium-driver)",
            b.display()
        );
    }
    (chromium, driver)
}

/// chromedriver on a port of its own, and the browser it starts with `profile`; both killed on
/// drop (chromium outlives a killed chromedriver: its processes are found by their profile).
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let needle = self.profile.display().to_string();
        for pid in pids_mentioning(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn browser(dir: &Path) -> (Driver, Client) {
    let (chromium, driver) = browser_bins();
    let port = free_port();
    let log = std::fs::File::create(dir.join("chromedriver.log")).expect("driver log");
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let profile = dir.join("chromium-profile");
    let driver = Driver {
        child,
        profile: profile.clone(),
    };
    // As the probe of this machine runs it: headless, as root (no sandbox), and nothing that
    // reaches out to the network on its own.
    let caps = serde_json::json!({
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let caps = match caps {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match fantoccini::ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "no WebDriver session: {e}\n{}",
                std::fs::read_to_string(dir.join("chromedriver.log")).unwrap_or_default()
            ),
        }
    }
}

/// Poll the text of `css` until `ok` holds (the page updates itself; nothing reloads it).
async fn wait_text(c: &Client, css: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed what was expected; last text: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn screenshot(c: &Client, name: &str) {
    let Some(dir) = std::env::var_os("DROVER_SCREENSHOT_DIR") else {
        return;
    };
    let png = c.screenshot().await.expect("screenshot");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(Path::new(&dir).join(name), png).expect("write screenshot");
}

async fn log_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/")).await.expect("open the page");
    let field = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#login-token"))
        .await
        .expect("the login form");
    field.send_keys(token).await.expect("type the token");
    click(c, "#login-submit", "the login button").await;
}

/// Click the element at `css` (`what` names it in a failure).
async fn click(c: &Client, css: &str, what: &str) {
    let e = c
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{what} ({css}) is not on the page: {e}"));
    e.click()
        .await
        .unwrap_or_else(|e| panic!("clicking {what}: {e}"));
}

/// Whether the element exists and is shown.
async fn visible(c: &Client, css: &str) -> bool {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

#[test]
fn web_console_as_operator_and_viewer() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--listen", &listen]);
    let base = format!("https://{listen}");
    let token = |role: &str| {
        d.ok(&["auth", "token", "create", "--role", role, "--name", role])
            .trim()
            .to_string()
    };
    let (operator, viewer) = (token("operator"), token("viewer"));
    d.ok(&[
        "vm",
        "create",
        "w1",
        "--memory",
        "256M",
        "--disk",
        "size=64M,id=data",
    ]);
    d.ok(&["vm", "start", "w1", "--wait"]);
    let started = Instant::now();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (_driver, c) = browser(d.dir.path()).await;

        // The operator logs in and sees the VM running, in the list and on its page.
        log_in(&c, &base, &operator).await;
        wait_text(&c, "#whoami", Duration::from_secs(10), |t| {
            t.contains("operator")
        })
        .await;
        wait_text(
            &c,
            "tr[data-vm='w1'] td.state",
            Duration::from_secs(10),
            |t| t == "running",
        )
        .await;
        wait_text(&c, "#host", Duration::from_secs(5), |t| t.contains("QEMU")).await;
        screenshot(&c, "overview.png").await;
        click(&c, "tr[data-vm='w1'] a", "the VM's link").await;
        wait_text(&c, "#vm-state", Duration::from_secs(10), |t| t == "running").await;
        wait_text(&c, "#console-mode", Duration::from_secs(10), |t| {
            t.contains("interactive")
        })
        .await;
        // Anything reloading the page would drop this mark.
        c.execute("window.droverMark = 1;", vec![])
            .await
            .expect("mark the page");

        // Stop from the page: the state changes on the page by itself.
        click(&c, "#vm-actions button[data-action='stop']", "the stop button").await;
        wait_text(&c, "#vm-state", Duration::from_secs(90), |t| t == "stopped").await;
        assert_eq!(
            d.json(&["vm", "show", "w1"])["state"],
            "stopped",
            "the API agrees with the page"
        );
        // ... and start again.
        click(&c, "#vm-actions button[data-action='start']", "the start button").await;
        wait_text(&c, "#vm-state", Duration::from_secs(60), |t| t == "running").await;
        let mark = c
            .execute("return window.droverMark;", vec![])
            .await
            .expect("read the mark");
        assert_eq!(mark, serde_json::json!(1), "the page was reloaded");

        // Type a command whose answer only the guest's shell can give: a line that is just
        // `hi-N` (the echoed input shows the expression, not its value). The shell may still be
        // starting, and what is typed before it reads the port is lost: type again until it answers.
        let n = std::process::id() % 10_000 + 10_000;
        let want = format!("hi-{}", n + 1);
        let keys = c
            .find(Locator::Css("#console .xterm-helper-textarea"))
            .await
            .expect("the terminal's input");
        let deadline = Instant::now() + Duration::from_secs(90);
        'answered: loop {
            keys.send_keys(&format!("echo hi-$(({n} + 1))\u{E007}"))
                .await
                .expect("type into the console");
            let tried = Instant::now();
            while tried.elapsed() < Duration::from_secs(5) {
                let rows = c
                    .find(Locator::Css("#console .xterm-rows"))
                    .await
                    .expect("the terminal");
                let text = rows.text().await.unwrap_or_default();
                if text.lines().any(|l| l.trim() == want) {
                    break 'answered;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(Instant::now() < deadline, "the guest's shell never answered {want}");
        }
        // A saved state from the page shows up in its table.
        click(&c, "#vm-actions button[data-action='snapshot']", "the snapshot button").await;
        wait_text(&c, "#vm-states tbody", Duration::from_secs(60), |t| {
            t.contains("ready") || t.contains("durable")
        })
        .await;
        assert_eq!(
            d.json(&["snapshot", "list", "w1"])
                .as_array()
                .map(|a| a.len()),
            Some(1),
            "the API has the state the page made"
        );
        screenshot(&c, "vm.png").await;
        // Restore it from its row: the VM runs again from that state (a new QEMU).
        let pid = d.json(&["vm", "show", "w1"])["pid"].clone();
        click(&c, "#vm-states button[data-restore]", "the restore button").await;
        wait_text(&c, "#vm-message", Duration::from_secs(60), |t| {
            t == "restore: done"
        })
        .await;
        wait_text(&c, "#vm-state", Duration::from_secs(10), |t| t == "running").await;
        let now = d.json(&["vm", "show", "w1"]);
        assert_eq!(now["state"], "running");
        assert_ne!(now["pid"], pid, "the restore started a new QEMU");

        // The viewer: no stop button on the page, a read-only console, and the API's refusal.
        click(&c, "#logout", "log out").await;
        log_in(&c, &base, &viewer).await;
        wait_text(&c, "#whoami", Duration::from_secs(10), |t| t.contains("viewer")).await;
        c.goto(&format!("{base}/#/vm/w1")).await.expect("the VM page");
        wait_text(&c, "#vm-state", Duration::from_secs(10), |t| t == "running").await;
        wait_text(&c, "#console-mode", Duration::from_secs(10), |t| {
            t.contains("read-only")
        })
        .await;
        for action in ["start", "stop", "snapshot", "migrate"] {
            assert!(
                !visible(&c, &format!("#vm-actions button[data-action='{action}']")).await,
                "a viewer sees the {action} button"
            );
        }
        let status = c
            .execute(
                "return fetch('/v1/vms/w1/stop', {method: 'POST', headers: {'Authorization': 'Bearer ' + arguments[0], 'Content-Type': 'application/json'}, body: '{}'}).then(r => r.status);",
                vec![serde_json::json!(viewer)],
            )
            .await
            .expect("the viewer's own stop call");
        assert_eq!(status, serde_json::json!(403), "the API refuses a viewer's stop");
        screenshot(&c, "vm-viewer.png").await;
        let _ = c.close().await;
    });
    assert_eq!(d.json(&["vm", "show", "w1"])["state"], "running");
    eprintln!(
        "web console test: {:.1} s from the first boot on",
        started.elapsed().as_secs_f64()
    );
}
