//! A real etcd for tests: Debian's `etcd-server` on loopback, free ports, a temporary data dir,
//! killed when dropped.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_cluster::etcd::Etcd;

pub struct EtcdServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdServer {
    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn start_etcd() -> Result<EtcdServer> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("etcd.log"))?)
        .spawn()
        .context("starting etcd (install Debian's etcd-server: scripts/install-deps.sh)")?;
    let server = EtcdServer {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(e) = Etcd::connect(
            std::slice::from_ref(&server.url),
            "/t",
            Duration::from_secs(1),
        )
        .await
        {
            if e.hosts().await.is_ok() {
                return Ok(server);
            }
        }
        if Instant::now() > deadline {
            bail!("etcd did not become healthy in 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn connect(server: &EtcdServer) -> Result<Etcd> {
    Ok(Etcd::connect(
        std::slice::from_ref(&server.url),
        "/drover",
        Duration::from_secs(2),
    )
    .await?)
}
