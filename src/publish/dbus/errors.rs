//! The typed D-Bus errors of SPEC X-1: `org.outlive.Error.<Name>`. A refusal is always one of
//! these errors, never a success reply with an error code inside.

/// Errors the agent returns over D-Bus.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.outlive.Error")]
pub enum OutliveError {
    /// A transport error (carried through, never produced by a rule).
    #[zbus(error)]
    ZBus(zbus::Error),
    NotFound(String),
    QueuePaused(String),
    QueueDisabled(String),
    QueueFull(String),
    NotGaveUp(String),
    DuplicateOpenEntry(String),
    PersistFailed(String),
    InvalidArgument(String),
    AccessDenied(String),
    Busy(String),
    /// The service manager did not start a run (`Runs1.Run`, SPEC C-1): its error.
    StartFailed(String),
}

impl From<zbus::fdo::Error> for OutliveError {
    fn from(e: zbus::fdo::Error) -> Self {
        OutliveError::ZBus(zbus::Error::FDO(Box::new(e)))
    }
}

impl OutliveError {
    /// `InvalidArgument` naming the field.
    pub fn invalid(field: &str, why: impl std::fmt::Display) -> OutliveError {
        OutliveError::InvalidArgument(format!("{field}: {why}"))
    }
}
