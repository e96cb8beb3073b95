//! droverd's error type and its mapping to API error codes.

use drover_api::{ApiError, ErrorCode};

/// Everything a host operation can fail with. Messages name the VM and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No such VM.
    #[error("VM {0} does not exist (see `drover vm list`)")]
    NotFound(String),
    /// Something else that does not exist; the message says what.
    #[error("{0}")]
    Missing(String),
    /// Name taken.
    #[error("a VM named {0} already exists")]
    AlreadyExists(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Wrong state for the operation.
    #[error("{0}")]
    Conflict(String),
    /// The host cannot give it.
    #[error("{0}")]
    Resources(String),
    /// The guest agent is not there.
    #[error("{0}")]
    Agent(String),
    /// Took too long.
    #[error("{0}")]
    Timeout(String),
    /// No guest image.
    #[error("{0}")]
    ImageMissing(String),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    Forbidden(String),
    /// A configuration (history) rule was broken.
    #[error(transparent)]
    Config(#[from] drover_model::ConfigError),
    /// Spec validation.
    #[error(transparent)]
    Model(#[from] drover_model::ModelError),
    /// Disk images.
    #[error(transparent)]
    Img(#[from] drover_qemu::img::ImgError),
    /// The store.
    #[error(transparent)]
    Store(#[from] drover_store::StoreError),
    /// QMP.
    #[error(transparent)]
    Qmp(#[from] drover_qemu::qmp::QmpError),
    /// Processes.
    #[error(transparent)]
    Process(#[from] drover_qemu::process::ProcessError),
    /// Another host could not be reached.
    #[error("{0}")]
    Peer(String),
    /// Another host refused (its error, with its code).
    #[error("{host}: {error}")]
    Remote {
        /// The other host.
        host: String,
        /// What it said.
        error: ApiError,
    },
    /// Anything else inside droverd.
    #[error("{0}")]
    Internal(String),
}

impl HostError {
    /// The stable code scripts see.
    pub fn code(&self) -> ErrorCode {
        use drover_qemu::img::ImgError;
        match self {
            HostError::NotFound(_) | HostError::Missing(_) => ErrorCode::NotFound,
            HostError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            HostError::Invalid(_) | HostError::Model(_) | HostError::Config(_) => {
                ErrorCode::InvalidArgument
            }
            HostError::Forbidden(_) => ErrorCode::Forbidden,
            HostError::Img(ImgError::Missing(_) | ImgError::Unusable { .. }) => {
                ErrorCode::InvalidArgument
            }
            HostError::Conflict(_) => ErrorCode::Conflict,
            HostError::Resources(_) => ErrorCode::InsufficientResources,
            HostError::Agent(_) => ErrorCode::AgentUnavailable,
            HostError::Timeout(_) => ErrorCode::Timeout,
            HostError::ImageMissing(_) => ErrorCode::ImageMissing,
            HostError::Peer(_) => ErrorCode::PeerUnreachable,
            // A write the store could not make durable: most often a full disk.
            HostError::Store(drover_store::StoreError::Op { op: "write", .. }) => {
                ErrorCode::InsufficientResources
            }
            HostError::Remote { error, .. } => error.code,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<drover_model::SizeError> for HostError {
    fn from(e: drover_model::SizeError) -> Self {
        HostError::Model(e.into())
    }
}

impl From<drover_qemu::live_migration::LiveMigrationError> for HostError {
    fn from(e: drover_qemu::live_migration::LiveMigrationError) -> Self {
        use drover_qemu::live_migration::LiveMigrationError as E;
        match e {
            E::Qmp(e) => HostError::Qmp(e),
            E::Timeout(m) => HostError::Timeout(m),
            E::Incomplete(_) => HostError::Conflict(e.to_string()),
            E::MirrorFailed | E::Failed(_) => HostError::Internal(e.to_string()),
        }
    }
}

impl From<std::io::Error> for HostError {
    fn from(e: std::io::Error) -> Self {
        HostError::Internal(e.to_string())
    }
}

/// Attach a path to an I/O error.
pub fn io_ctx(what: &str, path: &std::path::Path, e: std::io::Error) -> HostError {
    HostError::Internal(format!("{what} {}: {e}", path.display()))
}

/// Result alias.
pub type Result<T, E = HostError> = std::result::Result<T, E>;
