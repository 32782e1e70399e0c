//! outlive: a system agent that keeps one promise, that an autonomous run outlives its
//! session. See SPEC.md for the behaviour and DESIGN.md for the shape; each module names the
//! SPEC rules it implements.
//!
//! Data flows one way: `facts` → `queue` → `drainer` → `posture` → `publish`; `agent` wires
//! them; `cli` is `outlivectl`.

pub mod agent;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod drainer;
pub mod facts;
#[cfg(feature = "fault-hooks")]
pub mod faults;
pub mod files;
pub mod posture;
pub mod publish;
pub mod queue;
