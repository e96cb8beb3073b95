//! The calls one droverd makes on another (live and offline migration), as typed methods: the
//! routes are spelled here once, beside the types they carry.

use crate::{Client, ClientError, HostInfo, IncomingReady, IncomingRequest, MigrationStep, VmInfo};

impl Client {
    /// `GET /v1/host`: what the other host is (identity, QEMU, resources).
    pub async fn host_info(&self) -> Result<HostInfo, ClientError> {
        self.get("/v1/host").await
    }

    /// `GET /v1/vms/{name}`: one VM as the other host sees it.
    pub async fn vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.get(&format!("/v1/vms/{name}")).await
    }

    /// `POST /v1/migrations/incoming`: ask the destination to get ready to receive a VM.
    pub async fn migration_prepare(
        &self,
        req: &IncomingRequest,
    ) -> Result<IncomingReady, ClientError> {
        self.post("/v1/migrations/incoming", req).await
    }

    /// `POST /v1/migrations/{vm}/commit`: the switch-over is done; the destination takes the VM.
    pub async fn migration_commit(
        &self,
        vm: &str,
        step: &MigrationStep,
    ) -> Result<VmInfo, ClientError> {
        self.post(&format!("/v1/migrations/{vm}/commit"), step)
            .await
    }

    /// `POST /v1/migrations/{vm}/abort`: the source gave up; the destination drops its copy.
    pub async fn migration_abort(&self, vm: &str, step: &MigrationStep) -> Result<(), ClientError> {
        self.post::<_, serde_json::Value>(&format!("/v1/migrations/{vm}/abort"), step)
            .await
            .map(|_| ())
    }
}
