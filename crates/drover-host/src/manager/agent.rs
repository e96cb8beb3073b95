//! Reaching a VM's guest agent: waiting for it, and running commands through it.

use super::*;

impl Manager {
    /// Wait until the VM's agent is ready, up to `wait`.
    pub async fn wait_agent(&self, name: &str, wait: Duration) -> Result<AgentStatus> {
        let slot = self.slot(name)?;
        let Some(rt) = self.runtime(&slot) else {
            return Err(HostError::Conflict(format!(
                "VM {name} is not running; start it first (`drover vm start {name}`)"
            )));
        };
        let mut exited = rt.exited.clone();
        tokio::select! {
            r = rt.agent.wait_ready(wait) => r.map_err(|e| match e {
                LinkError::Timeout(_) => HostError::Timeout(format!(
                    "the agent in VM {name} did not become ready within {}s; see `drover vm console {name}`",
                    wait.as_secs()
                )),
                LinkError::NoAgent(why) => HostError::Agent(format!(
                    "VM {name} runs but shows no guest agent: {why}. Install drover-agent in the guest, or see `drover vm console {name}`; exec, guest saves and scans need it"
                )),
                other => HostError::Agent(format!("VM {name}: {other}")),
            }),
            _ = exited.wait_for(|e| *e) => {
                let why = lock(&slot.info).last_exit.clone().map(|e| format!("{}: {}", e.reason, e.detail.unwrap_or_default())).unwrap_or_default();
                Err(HostError::Conflict(format!("VM {name} stopped while waiting for its agent ({why})")))
            }
        }
    }

    /// The agent of running VM `name`, once ready: right after a start or restore it may be
    /// seconds away, so wait a little for it. `what` names the feature for the error.
    pub(super) async fn ready_agent(
        &self,
        name: &str,
        slot: &Arc<VmSlot>,
        what: &str,
    ) -> Result<AgentLink> {
        let Some(rt) = self.runtime(slot) else {
            return Err(HostError::Conflict(format!("VM {name} is not running")));
        };
        if !rt.agent.status().ready {
            match rt.agent.wait_ready(Duration::from_secs(10)).await {
                Ok(_) => {}
                Err(LinkError::NoAgent(why)) => {
                    return Err(HostError::Agent(format!(
                        "VM {name} shows no guest agent ({why}); {what} needs drover-agent in the guest"
                    )))
                }
                Err(_) => {
                    return Err(HostError::Agent(format!(
                        "the agent in VM {name} is not ready yet; wait with `drover vm start {name} --wait` or see `drover vm console {name}`"
                    )))
                }
            }
        }
        Ok(rt.agent.clone())
    }

    /// Run a command in the guest.
    pub async fn exec(
        &self,
        name: &str,
        req: drover_api::ExecRequest,
        caller: &Caller,
    ) -> Result<drover_proto::ExecResult> {
        let slot = self.look(name, VmAction::Exec, caller)?;
        if req.argv.is_empty() {
            return Err(HostError::Invalid("exec needs a command".into()));
        }
        if req.timeout_s == 0 || req.timeout_s > 24 * 3600 {
            return Err(HostError::Invalid(
                "exec timeout must be between 1 s and 24 h".into(),
            ));
        }
        let agent = self.ready_agent(name, &slot, "exec").await?;
        let body = drover_proto::Body::Exec(drover_proto::ExecRequest {
            argv: req.argv,
            stdin: req.stdin,
            timeout_ms: req.timeout_s * 1000,
        });
        // Validate locally what the agent would refuse, for a clear error.
        drover_proto::encode(&drover_proto::Frame::new(0, body.clone()))
            .map_err(|e| HostError::Invalid(e.to_string()))?;
        match agent
            .call(body, Duration::from_secs(req.timeout_s + 10))
            .await
        {
            Ok(drover_proto::Body::ExecResult(r)) => Ok(r),
            Ok(other) => Err(HostError::Agent(format!(
                "unexpected reply from the agent: {other:?}"
            ))),
            Err(LinkError::Timeout(d)) => Err(HostError::Timeout(format!(
                "the agent in VM {name} did not answer within {}s",
                d.as_secs()
            ))),
            Err(e) => Err(HostError::Agent(format!("VM {name}: {e}"))),
        }
    }
}
