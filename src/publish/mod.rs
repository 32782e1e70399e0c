//! Publication (SPEC §7): D-Bus, the journal writer, service-manager notifications and the
//! watchdog fed by progress, and logging setup. This layer reads snapshots of the layers below;
//! it does not reach into their internals.

pub mod dbus;
pub mod journal;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod notify;
pub(crate) mod watchdog;
