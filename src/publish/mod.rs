//! Publication (SPEC §7): D-Bus, the journal writer, service-manager notifications and the
//! watchdog fed by progress, and logging setup. This layer reads snapshots of the layers below;
//! it does not reach into their internals.

pub mod dbus;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod watchdog;
