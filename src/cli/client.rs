//! `outlivectl`'s D-Bus client: the connection, proxies for the agent's objects, and the
//! mapping of errors to SPEC §8's exit statuses (1 refused, 3 unreachable).

use std::collections::HashMap;

use zbus::wire::{OwnedVariant, Variant};
use zbus::{Connection, DBusError};

use super::exit;
use crate::publish::dbus::{AGENT_PATH, NAME, QUEUE_PATH};

/// `org.outlive.Agent1` on the main object.
#[zbus::proxy(
    interface = "org.outlive.Agent1",
    default_service = "org.outlive.Agent1",
    default_path = "/org/outlive/Agent1"
)]
pub trait Agent1 {
    fn get_host_facts(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn classify_path(&self, path: &str) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn reevaluate(&self) -> zbus::Result<()>;
}

/// `org.outlive.ResumeQueue1`.
#[zbus::proxy(
    interface = "org.outlive.ResumeQueue1",
    default_service = "org.outlive.Agent1",
    default_path = "/org/outlive/Agent1/ResumeQueue"
)]
pub trait ResumeQueue1 {
    fn list(&self) -> zbus::Result<Vec<HashMap<String, OwnedVariant>>>;
    fn enqueue(&self, request: HashMap<&str, Variant<'_>>) -> zbus::Result<(bool, String, String)>;
    fn cancel(&self, id: &str) -> zbus::Result<()>;
    fn requeue(&self, id: &str) -> zbus::Result<()>;
    fn pause(&self, kind: &str, reason: &str) -> zbus::Result<()>;
    fn resume(&self) -> zbus::Result<bool>;
    fn stop(&self, run_id: &str) -> zbus::Result<u32>;
    fn stop_all(&self) -> zbus::Result<()>;
    fn drain(&self) -> zbus::Result<HashMap<String, OwnedVariant>>;
    fn report_quota(&self, can_spawn: bool, valid_for_sec: u32) -> zbus::Result<()>;
}

/// `org.outlive.Runs1`.
#[zbus::proxy(
    interface = "org.outlive.Runs1",
    default_service = "org.outlive.Agent1",
    default_path = "/org/outlive/Agent1/Runs"
)]
pub trait Runs1 {
    fn run(&self, request: HashMap<&str, Variant<'_>>) -> zbus::Result<(String, String)>;
    fn watch(&self, unit: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<String>;
    fn unwatch(&self, run_id: &str) -> zbus::Result<()>;
    fn set_evidence(&self, run_id: &str, evidence: &[String]) -> zbus::Result<()>;
    fn revive(&self, run_id: &str) -> zbus::Result<String>;
    fn list_runs(&self) -> zbus::Result<Vec<HashMap<String, OwnedVariant>>>;
}

/// `org.outlive.Guards1`.
#[zbus::proxy(
    interface = "org.outlive.Guards1",
    default_service = "org.outlive.Agent1",
    default_path = "/org/outlive/Agent1/Guards"
)]
pub trait Guards1 {
    fn get_guards(&self) -> zbus::Result<Vec<HashMap<String, OwnedVariant>>>;
    fn report_guard(
        &self,
        key: &str,
        enabled: bool,
        dry_run: bool,
        tick_at_ms: u64,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<()>;
    fn ack_attention(&self) -> zbus::Result<()>;
}

/// A failure, with the exit status it means.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: i32,
    pub message: String,
}

impl Failure {
    pub(crate) fn refused(message: impl Into<String>) -> Failure {
        Failure {
            status: exit::REFUSED,
            message: message.into(),
        }
    }
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            status: exit::USAGE,
            message: message.into(),
        }
    }
    pub(crate) fn unreachable(message: impl Into<String>) -> Failure {
        Failure {
            status: exit::UNREACHABLE,
            message: message.into(),
        }
    }
}

/// What to do about each refusal the agent can answer with.
fn hint(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or(name) {
        "QueueDisabled" => {
            "`outlivectl lock` explains why the queue is disabled and how to recover"
        }
        "QueuePaused" => "revival is paused: `outlivectl resume` lets it continue",
        "QueueFull" => {
            "the queue holds queue.max_size open entries: cancel some or raise the limit"
        }
        "NotGaveUp" => "only entries that gave up can be requeued",
        "DuplicateOpenEntry" => "this run or job already has an open entry (`outlivectl queue`)",
        "PersistFailed" => {
            "the agent cannot write its state: check free space and the state directory"
        }
        "InvalidArgument" => "see `outlivectl help <command>`",
        "AccessDenied" => "this needs root or membership of the group `outlive`",
        "NotFound" => "`outlivectl queue` lists the entries",
        "Busy" => "a tick is running: try again in a moment",
        _ => "",
    }
}

/// Map a call's error to a failure (SPEC §8, X-1: the bus's own InvalidArgs and AccessDenied
/// are refusals too).
pub(crate) fn failure(e: zbus::Error) -> Failure {
    use zbus::fdo::Error as F;
    let (name, msg) = match &e {
        zbus::Error::MethodError(name, msg, _) => {
            (name.as_str().to_string(), msg.clone().unwrap_or_default())
        }
        zbus::Error::FDO(f) => match &**f {
            F::ServiceUnknown(m)
            | F::NameHasNoOwner(m)
            | F::NoReply(m)
            | F::Disconnected(m)
            | F::NoServer(m) => {
                return Failure::unreachable(format!(
                    "the agent is unreachable ({m}): is outlived running? (`systemctl status outlived`)"
                ));
            }
            F::AccessDenied(m) => (
                "org.freedesktop.DBus.Error.AccessDenied".to_string(),
                m.clone(),
            ),
            F::InvalidArgs(m) => (
                "org.freedesktop.DBus.Error.InvalidArgs".to_string(),
                m.clone(),
            ),
            other => (
                other.name().to_string(),
                other.description().unwrap_or_default().to_string(),
            ),
        },
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) | zbus::Error::Handshake(_) => {
            return Failure::unreachable(format!("cannot reach the message bus: {e}"));
        }
        _ => return Failure::unreachable(format!("talking to the agent failed: {e}")),
    };
    let h = hint(&name);
    let mut message = format!("{}: {msg}", name);
    if !h.is_empty() {
        message.push_str(&format!("\n  hint: {h}"));
    }
    Failure::refused(message)
}

/// Connect to the agent's bus (system, or session with `--user`) and check that it is there.
pub(crate) async fn connect(user: bool) -> Result<Connection, Failure> {
    let conn = if user {
        Connection::session().await
    } else {
        Connection::system().await
    }
    .map_err(|e| {
        Failure::unreachable(format!(
            "cannot reach the {} bus: {e}",
            if user { "session" } else { "system" }
        ))
    })?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.map_err(failure)?;
    let owned = dbus
        .name_has_owner(NAME.try_into().expect("a valid name"))
        .await
        .map_err(|e| failure(e.into()))?;
    if !owned {
        return Err(Failure::unreachable(format!(
            "the agent is not running: nothing owns {NAME} on the {} bus (`systemctl {}status outlived`)",
            if user { "session" } else { "system" },
            if user { "--user " } else { "" }
        )));
    }
    Ok(conn)
}

/// All properties of an interface, as JSON.
pub(crate) async fn properties(
    conn: &Connection,
    path: &str,
    interface: &str,
) -> Result<serde_json::Value, Failure> {
    let p = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(NAME)
        .path(path)
        .build()
        .await
        .map_err(failure)?;
    let iface: zbus::names::InterfaceName<'_> = interface
        .try_into()
        .map_err(|e: zbus::Error| Failure::usage(e.to_string()))?;
    let all = p.get_all(iface).await.map_err(|e| failure(e.into()))?;
    Ok(crate::publish::dbus::variant::dict_to_json(&all))
}

/// Proxies.
pub(crate) async fn queue(conn: &Connection) -> Result<ResumeQueue1Proxy<'_>, Failure> {
    ResumeQueue1Proxy::builder(conn)
        .path(QUEUE_PATH)
        .build()
        .await
        .map_err(failure)
}

pub(crate) async fn runs(conn: &Connection) -> Result<Runs1Proxy<'_>, Failure> {
    Runs1Proxy::builder(conn)
        .path(crate::publish::dbus::runs1::RUNS_PATH)
        .build()
        .await
        .map_err(failure)
}

pub(crate) async fn guards(conn: &Connection) -> Result<Guards1Proxy<'_>, Failure> {
    Guards1Proxy::builder(conn)
        .path(crate::publish::dbus::GUARDS_PATH)
        .build()
        .await
        .map_err(failure)
}

pub(crate) async fn agent(conn: &Connection) -> Result<Agent1Proxy<'_>, Failure> {
    Agent1Proxy::builder(conn)
        .path(AGENT_PATH)
        .build()
        .await
        .map_err(failure)
}

/// Run a future on a current-thread runtime.
pub(crate) fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}
