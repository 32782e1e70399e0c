//! The operator interface (SPEC §8): `outlived`'s options and `outlivectl`'s commands.
//!
//! The clap definitions live here, in the library, so that man pages and shell completions are
//! generated from the same definitions the binaries parse with. `outlivectl` exits 0 on
//! success, 1 when the agent (or the host) refused, 2 on usage errors, 3 when the agent is
//! unreachable.

pub mod host;
pub mod render;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit statuses of `outlivectl` (SPEC §8).
pub mod exit {
    pub const OK: i32 = 0;
    pub const REFUSED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const UNREACHABLE: i32 = 3;
}

/// `outlived`: the agent.
#[derive(Debug, Parser)]
#[command(
    name = "outlived",
    version,
    about = "The outlive agent: revives autonomous runs that outlived their session",
    long_about = "The outlive agent. It keeps a durable queue of reaped autonomous runs, revives them one at a \
                  time through the service manager when the host is calm, and publishes which safety systems are \
                  genuinely on (D-Bus org.outlive.Agent1, the journal, systemctl status, a metrics file). It never \
                  forks; run it under systemd (outlived.service) or launchd, or in the foreground.",
    after_help = "Run from a source tree without installing: cargo run --bin outlived -- --user --no-bus"
)]
pub struct OutlivedArgs {
    /// Configuration file [default: /etc/outlive/outlive.toml; with --user
    /// $XDG_CONFIG_HOME/outlive/outlive.toml]. A missing default file means all defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Run as a user's agent: session bus, user service manager, XDG paths (implied when not
    /// started as root).
    #[arg(long)]
    pub user: bool,
    /// Run without D-Bus publication (tests, diagnostics).
    #[arg(long)]
    pub no_bus: bool,
    /// Validate the configuration, print the effective configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print a configuration file with every key commented out at its default, with its
    /// meaning and range, and exit (e.g. to start /etc/outlive/outlive.toml from).
    #[arg(long, conflicts_with_all = ["check_config", "config"])]
    pub print_default_config: bool,
}

/// `outlived`'s entry point.
pub fn outlived_main() -> i32 {
    let args = OutlivedArgs::parse();
    if args.print_default_config {
        print!("{}", crate::config::commented_default_file());
        return 0;
    }
    crate::agent::main(crate::agent::Options {
        config: args.config,
        user: args.user,
        no_bus: args.no_bus,
        check_config: args.check_config,
    })
}

/// `outlivectl`: talk to the agent, or read host facts directly.
#[derive(Debug, Parser)]
#[command(
    name = "outlivectl",
    version,
    about = "Control and inspect the outlive agent",
    long_about = "Control and inspect the outlive agent over D-Bus (org.outlive.Agent1). Tables for people, \
                  --json for scripts. Exit status: 0 success, 1 refused (the reason and what to do are printed), \
                  2 usage error, 3 the agent is unreachable."
)]
pub struct Outlivectl {
    /// Talk to the user's agent on the session bus.
    #[arg(long, global = true)]
    pub user: bool,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `outlivectl`'s commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Host facts: identity, and the filesystem class of a path (works without the agent).
    Host {
        /// Classify the filesystem this path lives on.
        #[arg(long, value_name = "P")]
        path: Option<PathBuf>,
    },
}

/// `outlivectl`'s entry point.
pub fn outlivectl_main() -> i32 {
    let cli = match Outlivectl::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Host { path } => host::run(path.as_deref(), cli.json),
    }
}
