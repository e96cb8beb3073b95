//! The etcd adapter: the one place the cluster talks to etcd.
//!
//! Keys, under a prefix (`/drover/` by default):
//! - `hosts/<name>`: a host's inventory (JSON), written when it joins; stays when the host dies.
//! - `alive/<name>`: attached to the host's lease. Gone (lease expired) means the host is down.
//! - `draining/<name>`: set by an operator; the host takes no new members.
//! - `services/<name>`: a service's TOML as applied (validated before it is written).
//! - `assign/<service>/<member>`: an [`Assignment`]; its mod revision is the member's fencing token.
//! - `status/<service>`: the member states the leading controller last saw (fenced like every
//!   controller write).
//! - `scale/<service>/<app>`: a [`crate::scale::Target`]: how many members a scale rule wants now.
//! - `usage/<service>/<app>/<host>`: a [`crate::usage::Usage`] row: what the app's members used
//!   on that host.
//! - `election`: the controllers' election (etcd's election API, each candidate on its own lease).
//!
//! Every write a controller decides is a transaction conditioned on its leader key's create
//! revision ([`Leadership::fenced`]): once its lease is gone and another controller leads, the
//! condition fails and nothing is written, so a deposed leader cannot act.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaderKey, PutOptions, Txn, TxnOp,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::inventory::{HostInventory, HostRecord, HostStatus};
use crate::reconcile::{Assignment, MemberState};
use crate::service::{MemberId, Service};

/// A service's member states as the leading controller last saw them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The controller that wrote it.
    pub controller: String,
    /// Every member and its state, in start order.
    pub members: Vec<(MemberId, MemberState)>,
}

/// Largest value read from etcd; anything bigger is treated as corrupt.
pub const MAX_VALUE: usize = 1 << 20;

/// Why an etcd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd did not answer.
    #[error("etcd at {endpoints} is unreachable: {source}. Hosts keep running their VMs; start etcd or fix --etcd / DROVER_ETCD")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// An etcd request failed.
    #[error("etcd {op}: {source}")]
    Request {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// The write was refused because this controller no longer leads.
    #[error("this controller is no longer the leader; the write was refused")]
    NotLeader,
    /// The lease ran out: the host or controller was cut off too long.
    #[error("the etcd lease {0:x} expired")]
    LeaseLost(i64),
    /// A value in etcd cannot be read.
    #[error("etcd key {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

fn json(key: &str, value: &impl serde::Serialize) -> Result<Vec<u8>, EtcdError> {
    serde_json::to_vec(value).map_err(|e| EtcdError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn req(op: &'static str) -> impl FnOnce(etcd_client::Error) -> EtcdError {
    move |source| EtcdError::Request { op, source }
}

/// True for errors that mean no etcd answered (connection refused, timed out, no leader).
fn unreachable(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    matches!(e, etcd_client::Error::TransportError(_))
        || [
            "tcp connect error",
            "currently unavailable",
            "Timeout expired",
            "transport error",
        ]
        .iter()
        .any(|t| text.contains(t))
}

/// A client of one etcd member that answers, tried in turn from a place that depends on the
/// process (so hosts and controllers spread over the members).
///
/// Not etcd-client's balanced channel over all endpoints: with one member down it routes
/// requests to that member too and they fail ("tcp connect error"; etcdv3/etcd-client#39), so
/// one lost member of three would stop every host, controller and command.
async fn connect_one(endpoints: &[String], timeout: Duration) -> Result<Client, EtcdError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout);
    let unreachable = |source| EtcdError::Unreachable {
        endpoints: endpoints.join(","),
        source,
    };
    let n = endpoints.len();
    if n == 0 {
        return Err(unreachable(etcd_client::Error::InvalidArgs(
            "no etcd endpoints given".into(),
        )));
    }
    let first = std::process::id() as usize % n;
    let mut last = None;
    for k in 0..n {
        let endpoint = endpoints[(first + k) % n].as_str();
        let tried = async {
            let mut c = Client::connect([endpoint], Some(opts.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(timeout, tried).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{endpoint}: no answer within {timeout:?}"),
                )))
            }
        }
    }
    Err(unreachable(last.unwrap_or_else(|| {
        etcd_client::Error::InvalidArgs("no etcd endpoint answered".into())
    })))
}

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl Etcd {
    /// Connect to etcd (`http://10.0.0.1:2379`, ...), every request bounded by `timeout`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Etcd, EtcdError> {
        let client = connect_one(endpoints, timeout).await?;
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Etcd {
            client,
            prefix,
            endpoints: endpoints.to_vec(),
            timeout,
        })
    }

    fn req(&self, op: &'static str) -> impl FnOnce(etcd_client::Error) -> EtcdError + '_ {
        move |source| {
            if unreachable(&source) {
                EtcdError::Unreachable {
                    endpoints: self.endpoints.join(","),
                    source,
                }
            } else {
                EtcdError::Request { op, source }
            }
        }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// The key of a member's assignment.
    pub fn assignment_key(&self, member: &MemberId) -> String {
        self.key(&format!("assign/{}/{}", member.service, member.short()))
    }

    async fn get_prefix(&self, rest: &str) -> Result<Vec<(String, Vec<u8>, i64)>, EtcdError> {
        let mut kv = self.client.kv_client();
        let resp = kv
            .get(self.key(rest), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.req("read"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if kv.value().len() > MAX_VALUE {
                    return Err(EtcdError::Corrupt {
                        key,
                        reason: format!("value of {} bytes", kv.value().len()),
                    });
                }
                Ok((key, kv.value().to_vec(), kv.mod_revision()))
            })
            .collect()
    }

    fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, EtcdError> {
        serde_json::from_slice(value).map_err(|e| EtcdError::Corrupt {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    // ---- hosts ----

    /// Join the cluster: write the host's inventory and mark it alive on a new lease of `ttl`.
    /// Keep the lease alive with [`HostLease::renew`]; once it lapses the host counts as down.
    pub async fn join(
        &self,
        inventory: &HostInventory,
        ttl: Duration,
    ) -> Result<HostLease, EtcdError> {
        let mut lease = self.client.lease_client();
        let grant = lease
            .grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(self.req("lease grant"))?;
        let id = grant.id();
        let value = json(&inventory.name, inventory)?;
        let txn = Txn::new().and_then(vec![
            TxnOp::put(self.key(&format!("hosts/{}", inventory.name)), value, None),
            TxnOp::put(
                self.key(&format!("alive/{}", inventory.name)),
                id.to_string(),
                Some(PutOptions::new().with_lease(id)),
            ),
        ]);
        self.client
            .kv_client()
            .txn(txn)
            .await
            .map_err(self.req("join"))?;
        let (keeper, stream) = lease
            .keep_alive(id)
            .await
            .map_err(self.req("lease keep-alive"))?;
        Ok(HostLease {
            id,
            ttl,
            keeper,
            stream,
            endpoints: self.endpoints.clone(),
            timeout: self.timeout,
        })
    }

    /// Mark a host draining (or not): it keeps its members and takes no new ones.
    pub async fn set_draining(&self, host: &str, draining: bool) -> Result<(), EtcdError> {
        let mut kv = self.client.kv_client();
        let key = self.key(&format!("draining/{host}"));
        if draining {
            kv.put(key, "1", None).await.map_err(self.req("drain"))?;
        } else {
            kv.delete(key, None).await.map_err(self.req("undrain"))?;
        }
        Ok(())
    }

    /// Every host that ever joined, with its status (down when its lease is gone).
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, EtcdError> {
        let alive: Vec<String> = self
            .get_prefix("alive/")
            .await?
            .into_iter()
            .map(|(k, _, _)| k.rsplit('/').next().unwrap_or_default().to_string())
            .collect();
        let draining: Vec<String> = self
            .get_prefix("draining/")
            .await?
            .into_iter()
            .map(|(k, _, _)| k.rsplit('/').next().unwrap_or_default().to_string())
            .collect();
        self.get_prefix("hosts/")
            .await?
            .into_iter()
            .map(|(k, v, _)| {
                let inventory: HostInventory = Self::parse(&k, &v)?;
                let status = if !alive.contains(&inventory.name) {
                    HostStatus::Down
                } else if draining.contains(&inventory.name) {
                    HostStatus::Draining
                } else {
                    HostStatus::Up
                };
                Ok(HostRecord { inventory, status })
            })
            .collect()
    }

    // ---- services (the operator's intent) ----

    /// Store a service (already validated) as its TOML text.
    pub async fn put_service(&self, name: &str, toml: &str) -> Result<(), EtcdError> {
        self.client
            .kv_client()
            .put(self.key(&format!("services/{name}")), toml, None)
            .await
            .map_err(self.req("apply service"))?;
        Ok(())
    }

    /// Remove a service; its members are stopped by the controller. False if it did not exist.
    pub async fn delete_service(&self, name: &str) -> Result<bool, EtcdError> {
        let resp = self
            .client
            .kv_client()
            .delete(self.key(&format!("services/{name}")), None)
            .await
            .map_err(self.req("delete service"))?;
        Ok(resp.deleted() > 0)
    }

    /// Every stored service, parsed again (a stored file that no longer validates is an error).
    pub async fn services(&self) -> Result<Vec<Service>, EtcdError> {
        self.get_prefix("services/")
            .await?
            .into_iter()
            .map(|(k, v, _)| {
                let text = String::from_utf8(v).map_err(|e| EtcdError::Corrupt {
                    key: k.clone(),
                    reason: e.to_string(),
                })?;
                Service::from_toml(&text).map_err(|e| EtcdError::Corrupt {
                    key: k,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    // ---- assignments ----

    /// Every assignment, each with its current revision (its fencing token).
    pub async fn assignments(&self) -> Result<Vec<Assignment>, EtcdError> {
        self.get_prefix("assign/")
            .await?
            .into_iter()
            .map(|(k, v, rev)| {
                let mut a: Assignment = Self::parse(&k, &v)?;
                a.revision = rev;
                Ok(a)
            })
            .collect()
    }

    // ---- scale targets and usage ----

    /// Every app's scale target, by (service, app).
    pub async fn scale_targets(
        &self,
    ) -> Result<std::collections::BTreeMap<(String, String), crate::scale::Target>, EtcdError> {
        self.get_prefix("scale/")
            .await?
            .into_iter()
            .map(|(k, v, _)| {
                let (key, t): ((String, String), crate::scale::Target) = Self::parse(&k, &v)?;
                Ok((key, t))
            })
            .collect()
    }

    /// Every usage row.
    pub async fn usage(
        &self,
    ) -> Result<Vec<(crate::usage::UsageKey, crate::usage::Usage)>, EtcdError> {
        self.get_prefix("usage/")
            .await?
            .into_iter()
            .map(|(k, v, _)| Self::parse(&k, &v))
            .collect()
    }

    /// The member states the leading controller last wrote for a service, with the time (ms
    /// since the epoch) it wrote them; `None` before its first round.
    pub async fn status(&self, service: &str) -> Result<Option<ServiceStatus>, EtcdError> {
        let key = self.key(&format!("status/{service}"));
        let resp = self
            .client
            .kv_client()
            .get(key.clone(), None)
            .await
            .map_err(self.req("read status"))?;
        resp.kvs()
            .first()
            .map(|kv| Self::parse(&key, kv.value()))
            .transpose()
    }

    /// The host-side fencing check: may `host` start `member` with `token`? Only if the member's
    /// assignment is, right now, to this host at exactly this revision. A stale token (the
    /// member was re-placed or restarted since) or another host's assignment is refused.
    pub async fn check_token(
        &self,
        member: &MemberId,
        host: &str,
        token: i64,
    ) -> Result<bool, EtcdError> {
        let key = self.assignment_key(member);
        let resp = self
            .client
            .kv_client()
            .get(key.clone(), None)
            .await
            .map_err(self.req("read assignment"))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(false);
        };
        let a: Assignment = Self::parse(&key, kv.value())?;
        Ok(a.host == host && kv.mod_revision() == token)
    }

    // ---- leadership ----

    /// Campaign to lead the controllers under `name` (this controller's id), on a lease of
    /// `ttl` kept alive in the background. Returns once this controller leads.
    pub async fn campaign(&self, name: &str, ttl: Duration) -> Result<Leadership, EtcdError> {
        let mut lease = self.client.lease_client();
        let id = lease
            .grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(self.req("lease grant"))?
            .id();
        let (mut keeper, mut stream) = lease
            .keep_alive(id)
            .await
            .map_err(self.req("lease keep-alive"))?;
        let (lost_tx, lost_rx) = watch::channel(false);
        let period = (ttl / 3).max(Duration::from_millis(200));
        // Keep the lease alive; the first failure (or an expired lease) means leadership is lost.
        let keep = tokio::spawn(async move {
            loop {
                let ok = keeper.keep_alive().await.is_ok()
                    && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0);
                if !ok {
                    let _ = lost_tx.send(true);
                    return;
                }
                tokio::time::sleep(period).await;
            }
        });
        // A campaign waits until it wins, so it goes on a connection without the request timeout.
        let opts = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_keep_alive(Duration::from_secs(2), self.timeout);
        let won = async {
            let mut waiting =
                Client::connect(&self.endpoints, Some(opts))
                    .await
                    .map_err(|source| EtcdError::Unreachable {
                        endpoints: self.endpoints.join(","),
                        source,
                    })?;
            let resp = waiting
                .campaign(self.key("election"), name, id)
                .await
                .map_err(self.req("campaign"))?;
            resp.leader().cloned().ok_or_else(|| EtcdError::Corrupt {
                key: self.key("election"),
                reason: "campaign answered without a leader key".into(),
            })
        };
        let leader = match won.await {
            Ok(l) => l,
            Err(e) => {
                keep.abort();
                return Err(e);
            }
        };
        Ok(Leadership {
            etcd: self.clone(),
            leader,
            lease: id,
            lost: lost_rx,
            keep,
        })
    }

    /// The name of the controller that leads now, if any.
    pub async fn leader(&self) -> Result<Option<String>, EtcdError> {
        match self
            .client
            .election_client()
            .leader(self.key("election"))
            .await
        {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(EtcdError::Request {
                op: "leader",
                source: e,
            }),
        }
    }
}

/// A host's lease: renew it more often than its TTL, or the host counts as down.
pub struct HostLease {
    id: i64,
    ttl: Duration,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
    /// To keep the lease alive through another member when this one fails.
    endpoints: Vec<String>,
    timeout: Duration,
}

impl HostLease {
    /// The lease's id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Its time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Renew the lease; the TTL etcd granted again. `LeaseLost` once it has expired. If the
    /// member it talks to fails, the keep-alive is opened again on another one and retried
    /// once (a lease is the cluster's, not one member's).
    pub async fn renew(&mut self) -> Result<Duration, EtcdError> {
        match self.renew_here().await {
            Err(EtcdError::LeaseLost(id)) => Err(EtcdError::LeaseLost(id)),
            Err(e) => {
                tracing::warn!(lease = self.id, error = %e, "lease keep-alive failed; trying another etcd member");
                let client = connect_one(&self.endpoints, self.timeout).await?;
                let (keeper, stream) = client
                    .lease_client()
                    .keep_alive(self.id)
                    .await
                    .map_err(req("lease keep-alive"))?;
                (self.keeper, self.stream) = (keeper, stream);
                self.renew_here().await
            }
            ok => ok,
        }
    }

    async fn renew_here(&mut self) -> Result<Duration, EtcdError> {
        self.keeper
            .keep_alive()
            .await
            .map_err(req("lease keep-alive"))?;
        match self
            .stream
            .message()
            .await
            .map_err(req("lease keep-alive"))?
        {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            _ => Err(EtcdError::LeaseLost(self.id)),
        }
    }
}

/// This controller leads. Writes go through [`Leadership::fenced`].
pub struct Leadership {
    etcd: Etcd,
    leader: LeaderKey,
    lease: i64,
    lost: watch::Receiver<bool>,
    keep: JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keep.abort();
    }
}

impl Leadership {
    /// The leader key's create revision: the leadership's epoch.
    pub fn epoch(&self) -> i64 {
        self.leader.rev()
    }

    /// True once the lease keep-alive failed (the controller must stop acting).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Stop renewing the lease without resigning, as a controller cut off from etcd would: the
    /// lease (and with it the leadership) expires after its TTL. For shutdown paths and tests.
    pub fn stop_renewing(&self) {
        self.keep.abort();
    }

    /// Wait until leadership is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }

    /// Run `ops` only if this controller still leads (its leader key still exists with the
    /// create revision it had when elected). Returns the revision of the write.
    pub async fn fenced(&self, ops: Vec<TxnOp>) -> Result<i64, EtcdError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.leader.key().to_vec(),
                CompareOp::Equal,
                self.leader.rev(),
            )])
            .and_then(ops);
        let resp = self
            .etcd
            .client
            .kv_client()
            .txn(txn)
            .await
            .map_err(self.etcd.req("fenced write"))?;
        if !resp.succeeded() {
            return Err(EtcdError::NotLeader);
        }
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Write a member's assignment; the revision returned is its new fencing token.
    pub async fn assign(&self, a: &Assignment) -> Result<i64, EtcdError> {
        let key = self.etcd.assignment_key(&a.member);
        let value = json(&key, a)?;
        self.fenced(vec![TxnOp::put(key, value, None)]).await
    }

    /// Record a service's member states for `drover service show` (or remove them: `None`).
    pub async fn put_status(
        &self,
        service: &str,
        status: Option<&ServiceStatus>,
    ) -> Result<(), EtcdError> {
        let key = self.etcd.key(&format!("status/{service}"));
        let op = match status {
            Some(st) => TxnOp::put(key.clone(), json(&key, st)?, None),
            None => TxnOp::delete(key, None),
        };
        self.fenced(vec![op]).await.map(|_| ())
    }

    /// Write an app's scale target (`None`: remove it, the service or its rule is gone).
    pub async fn put_scale(
        &self,
        service: &str,
        app: &str,
        target: Option<&crate::scale::Target>,
    ) -> Result<(), EtcdError> {
        let key = self.etcd.key(&format!("scale/{service}/{app}"));
        let op = match target {
            Some(t) => TxnOp::put(key.clone(), json(&key, &((service, app), t))?, None),
            None => TxnOp::delete(key, None),
        };
        self.fenced(vec![op]).await.map(|_| ())
    }

    /// Add what was counted to the stored usage rows, in one fenced write.
    pub async fn add_usage(
        &self,
        counted: &std::collections::BTreeMap<crate::usage::UsageKey, crate::usage::Usage>,
    ) -> Result<(), EtcdError> {
        let mut rows: std::collections::BTreeMap<_, _> =
            self.etcd.usage().await?.into_iter().collect();
        let mut ops = Vec::new();
        for (k, u) in counted {
            let row = rows.entry(k.clone()).or_insert_with(Default::default);
            row.add(u);
            let key = self.etcd.key(&k.path());
            ops.push(TxnOp::put(key.clone(), json(&key, &(k, &*row))?, None));
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.fenced(ops).await.map(|_| ())
    }

    /// Delete a member's assignment.
    pub async fn unassign(&self, member: &MemberId) -> Result<(), EtcdError> {
        self.fenced(vec![TxnOp::delete(self.etcd.assignment_key(member), None)])
            .await
            .map(|_| ())
    }

    /// Give up leadership now (another controller takes over at once) and revoke the lease.
    pub async fn resign(self) -> Result<(), EtcdError> {
        let mut election = self.etcd.client.election_client();
        election
            .resign(Some(
                etcd_client::ResignOptions::new().with_leader(self.leader.clone()),
            ))
            .await
            .map_err(self.etcd.req("resign"))?;
        let _ = self.etcd.client.lease_client().revoke(self.lease).await;
        Ok(())
    }
}
