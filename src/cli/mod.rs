//! The operator interface (SPEC §8): `outlived`'s options and `outlivectl`'s commands.
//!
//! The clap definitions live here, in the library, so that man pages and shell completions are
//! generated from the same definitions the binaries parse with. `outlivectl` exits 0 on
//! success, 1 when the agent (or the host) refused, 2 on usage errors, 3 when the agent is
//! unreachable.

pub(crate) mod audit;
pub(crate) mod client;
pub(crate) mod docs;
pub(crate) mod guards;
pub(crate) mod host;
pub(crate) mod lock;
pub(crate) mod queue;
pub(crate) mod render;
pub(crate) mod runs;

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
    /// One screen: posture, anomalies, attention, queue and lock.
    Status,
    /// The guards: which safety systems are genuinely on (anomalies first, with what to do).
    Guards,
    /// Clear the one-off notices from the attention item.
    Ack,
    /// The revival queue: its state and its entries.
    Queue,
    /// Queue a reaped run for revival (flags mirror the Enqueue dictionary).
    #[command(
        after_help = "Examples:\n  outlivectl enqueue --run-id agent-7 --unit agent@7.service --evidence active-subagent\n  outlivectl enqueue --job nightly --resume-on-reap --evidence structural-long-work -- /usr/bin/make all"
    )]
    Enqueue(Box<EnqueueFlags>),
    /// Cancel an open entry.
    Cancel {
        /// The entry id (rq-…).
        id: String,
    },
    /// Requeue an entry that gave up.
    Requeue {
        /// The entry id (rq-…).
        id: String,
    },
    /// Pause revival (emergency pauses heal themselves when stale; maintenance pauses never do).
    Pause {
        #[arg(long, value_parser = ["emergency", "maintenance"])]
        kind: String,
        #[arg(long)]
        reason: String,
    },
    /// Resume revival after any pause.
    Resume,
    /// Start a command as a run that outlives its session: a transient unit outlived watches
    /// and revives when someone else reaps it.
    #[command(
        after_help = "Examples:\n  outlivectl run -- sleep 1000\n  outlivectl run --run-id agent-7 --resume 'my-agent --continue' --evidence uncommitted-worktree-work -- my-agent\n\nA run stopped with `systemctl stop` or `outlivectl stop RUN_ID`, or one that finished or failed by itself, is never revived."
    )]
    Run(Box<RunFlags>),
    /// Watched runs: how each is, how it ended, and its revival.
    Runs,
    /// Watch a unit that runs already: revive it with StartUnit when someone else reaps it.
    Watch {
        /// The unit (loaded and active).
        unit: String,
        /// Evidence that the run is working (repeatable).
        #[arg(long, value_name = "NAME")]
        evidence: Vec<String>,
        /// autonomous: while active the run is mid-work; declared: only its declared evidence.
        #[arg(long, value_parser = ["autonomous", "declared"])]
        policy: Option<String>,
        /// A name for the run (display).
        #[arg(long)]
        session: Option<String>,
    },
    /// Stop watching a run; it keeps running.
    Unwatch {
        /// The run's id.
        run_id: String,
    },
    /// Declare a run's evidence (replaces what it declared before); a run may declare its own,
    /// as `outlivectl evidence $OUTLIVE_RUN_ID NAME…`.
    Evidence {
        /// The run's id.
        run_id: String,
        /// Evidence names (none: clear).
        names: Vec<String>,
    },
    /// Queue an ended run for revival by hand (e.g. one whose end reads `unknown`).
    Revive {
        /// The run's id.
        run_id: String,
    },
    /// Stop a run: stop its unit if outlived watches it, cancel its open entries and record the
    /// stop so it is never revived.
    Stop {
        /// The run's id.
        run_id: String,
    },
    /// Stop all revival: a durable global stop and a deliberate halt until `resume`.
    StopAll,
    /// Run a drainer tick now, skipping the calm gate; prints its outcome.
    Drain,
    /// Report quota headroom for the quota gate (for a quota tracker).
    #[command(
        after_help = "Examples:\n  outlivectl quota --can-spawn false --valid-for 300\n  outlivectl quota --can-spawn true --valid-for 60"
    )]
    Quota {
        /// Whether new runs may be started now.
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        can_spawn: bool,
        /// How long the report holds, in seconds; after that the gate passes again.
        #[arg(long, value_name = "SECS")]
        valid_for: u32,
    },
    /// The host lock: record, facts and decision, explained ("why is my queue disabled?").
    Lock {
        /// The state directory [default: from the configuration].
        #[arg(long, value_name = "D", global = true)]
        state_dir: Option<PathBuf>,
        /// The configuration file to read the state directory from.
        #[arg(long, value_name = "PATH", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<LockAction>,
    },
    /// Print a shell completion script (e.g. `source <(outlivectl completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages under DIR (man1/, man5/, man8/); for packaging.
    #[command(hide = true)]
    GenerateMan { dir: PathBuf },
    /// The audit trail (audit.jsonl in the state and runtime directories).
    Audit {
        /// Only events since this time (RFC 3339) or this long ago (10m, 2h, 3d).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// The configuration file to read the directories from.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

/// `outlivectl run`'s flags (SPEC §8).
#[derive(Debug, clap::Args)]
pub struct RunFlags {
    /// The run's stable id [default: one the agent assigns].
    #[arg(long)]
    run_id: Option<String>,
    /// A name for the run (display).
    #[arg(long)]
    session: Option<String>,
    /// Evidence that the run is working (repeatable).
    #[arg(long, value_name = "NAME")]
    evidence: Vec<String>,
    /// autonomous [default, capture.evidence_policy]: while active the run is mid-work;
    /// declared: only the evidence it declares.
    #[arg(long, value_parser = ["autonomous", "declared"])]
    policy: Option<String>,
    /// The command that resumes the run when it is revived, one string split by shell word
    /// rules without expansion (e.g. 'my-agent --continue').
    #[arg(long, value_name = "CMDLINE")]
    resume: Option<String>,
    /// An environment variable for the run (repeatable); `--env K` copies this shell's value.
    /// Only these are sent; HOME, USER, LOGNAME and SHELL come from the run's user.
    #[arg(long, value_name = "K=V|K")]
    env: Vec<String>,
    /// The run's working directory [default: the current directory].
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// The run's worktree (its working directory when revived).
    #[arg(long)]
    worktree: Option<PathBuf>,
    /// Run as this uid (root only; it must exist in the user database).
    #[arg(long)]
    as_uid: Option<u32>,
    /// Run with this gid (root only) [default: the primary group of --as-uid's user].
    #[arg(long)]
    as_gid: Option<u32>,
    /// The command, after `--` (its first word is looked up in PATH).
    #[arg(last = true, value_name = "ARGV", required = true)]
    argv: Vec<String>,
}

impl From<RunFlags> for runs::RunArgs {
    fn from(f: RunFlags) -> Self {
        runs::RunArgs {
            run_id: f.run_id,
            session: f.session,
            evidence: f.evidence,
            policy: f.policy,
            resume: f.resume,
            env: f.env,
            cwd: f.cwd,
            worktree: f.worktree,
            as_uid: f.as_uid,
            as_gid: f.as_gid,
            argv: f.argv,
        }
    }
}

/// `outlivectl lock` actions.
#[derive(Debug, Subcommand)]
pub enum LockAction {
    /// Remove the lock file after verifying that no process holds it (root), then ask the
    /// agent to re-evaluate. Verify first that nothing else uses the state directory.
    Clear,
}

/// `outlivectl enqueue`'s flags (SPEC §8).
#[derive(Debug, clap::Args)]
pub struct EnqueueFlags {
    /// The run's stable id (makes the entry interactive).
    #[arg(long)]
    run_id: Option<String>,
    /// The scheduled job's slug.
    #[arg(long)]
    job: Option<String>,
    /// The job opted in to revival.
    #[arg(long)]
    resume_on_reap: bool,
    /// The name of the reaped vessel (display).
    #[arg(long)]
    session: Option<String>,
    /// Revive this systemd unit.
    #[arg(long)]
    unit: Option<String>,
    /// An environment variable for the command (repeatable).
    #[arg(long, value_name = "K=V")]
    env: Vec<String>,
    /// The run's working directory [default: the current directory].
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// The run's worktree.
    #[arg(long)]
    worktree: Option<PathBuf>,
    /// Why the run was reaped.
    #[arg(long)]
    reason: Option<String>,
    #[arg(long, default_value = "terminal", value_parser = ["terminal", "recovery-bounce"])]
    disposition: String,
    #[arg(long, default_value = "autonomous", value_parser = ["autonomous", "operator"])]
    origin: String,
    /// Evidence that the run was working (repeatable).
    #[arg(long, value_name = "NAME")]
    evidence: Vec<String>,
    /// An active autonomous run was age-limited.
    #[arg(long)]
    active_run: bool,
    /// A file whose existence means the run is still registered.
    #[arg(long)]
    run_state_file: Option<PathBuf>,
    /// When the run was reaped (ms since the epoch, or RFC 3339) [default: now].
    #[arg(long)]
    reaped_at: Option<String>,
    /// Run as this uid (root only; it must exist in the user database).
    #[arg(long)]
    as_uid: Option<u32>,
    /// Run with this gid (root only). Default: the primary group of --as-uid's user (gid 0 for
    /// a non-root user only when given here), else the caller's.
    #[arg(long)]
    as_gid: Option<u32>,
    /// The command to revive, after `--` (`argv[0]` must be absolute).
    #[arg(last = true, value_name = "ARGV")]
    argv: Vec<String>,
}

impl From<EnqueueFlags> for queue::EnqueueArgs {
    fn from(f: EnqueueFlags) -> Self {
        queue::EnqueueArgs {
            run_id: f.run_id,
            job: f.job,
            resume_on_reap: f.resume_on_reap,
            session: f.session,
            unit: f.unit,
            env: f.env,
            cwd: f.cwd,
            worktree: f.worktree,
            reason: f.reason,
            disposition: f.disposition,
            origin: f.origin,
            evidence: f.evidence,
            active_run: f.active_run,
            run_state_file: f.run_state_file,
            reaped_at: f.reaped_at,
            as_uid: f.as_uid,
            as_gid: f.as_gid,
            argv: f.argv,
        }
    }
}

/// The watched-run commands (C-8).
async fn runs_command(c: Command, user: bool, json: bool) -> Result<(), client::Failure> {
    let op = match c {
        Command::Run(f) => return runs::run(user, json, &(*f).into()).await,
        Command::Runs => return runs::list(user, json).await,
        Command::Watch {
            unit,
            evidence,
            policy,
            session,
        } => runs::Op::Watch {
            unit,
            evidence,
            policy,
            session,
        },
        Command::Unwatch { run_id } => runs::Op::Unwatch(run_id),
        Command::Evidence { run_id, names } => runs::Op::Evidence(run_id, names),
        Command::Revive { run_id } => runs::Op::Revive(run_id),
        _ => unreachable!("only the watched-run commands come here"),
    };
    runs::op(user, json, op).await
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
    let (user, json) = (cli.user, cli.json);
    let result = match cli.command {
        Command::Host { path } => return host::run(path.as_deref(), json),
        Command::Completions { shell } => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&docs::completion(shell));
            return exit::OK;
        }
        Command::GenerateMan { dir } => {
            return match docs::write_man_pages(&dir) {
                Ok(_) => exit::OK,
                Err(e) => {
                    eprintln!("outlivectl: writing man pages under {}: {e}", dir.display());
                    exit::REFUSED
                }
            };
        }
        Command::Status => client::block_on(guards::status(user, json)),
        Command::Guards => client::block_on(guards::guards(user, json)),
        Command::Ack => client::block_on(guards::ack(user, json)),
        Command::Queue => client::block_on(queue::show(user, json)),
        Command::Enqueue(f) => client::block_on(queue::enqueue(user, json, &(*f).into())),
        Command::Cancel { id } => client::block_on(queue::op(user, json, queue::Op::Cancel(id))),
        Command::Requeue { id } => client::block_on(queue::op(user, json, queue::Op::Requeue(id))),
        Command::Pause { kind, reason } => {
            client::block_on(queue::op(user, json, queue::Op::Pause { kind, reason }))
        }
        Command::Resume => client::block_on(queue::op(user, json, queue::Op::Resume)),
        c @ (Command::Run(_)
        | Command::Runs
        | Command::Watch { .. }
        | Command::Unwatch { .. }
        | Command::Evidence { .. }
        | Command::Revive { .. }) => client::block_on(runs_command(c, user, json)),
        Command::Stop { run_id } => {
            client::block_on(queue::op(user, json, queue::Op::Stop(run_id)))
        }
        Command::StopAll => client::block_on(queue::op(user, json, queue::Op::StopAll)),
        Command::Drain => client::block_on(queue::op(user, json, queue::Op::Drain)),
        Command::Quota {
            can_spawn,
            valid_for,
        } => client::block_on(queue::op(
            user,
            json,
            queue::Op::Quota {
                can_spawn,
                valid_for_sec: valid_for,
            },
        )),
        Command::Lock {
            state_dir,
            config,
            action: None,
        } => client::block_on(lock::show(
            state_dir.as_deref(),
            config.as_deref(),
            user,
            json,
        )),
        Command::Lock {
            state_dir,
            config,
            action: Some(LockAction::Clear),
        } => client::block_on(lock::clear(
            state_dir.as_deref(),
            config.as_deref(),
            user,
            json,
        )),
        Command::Audit { since, config } => {
            audit::show(since.as_deref(), config.as_deref(), user, json)
        }
    };
    match result {
        Ok(()) => exit::OK,
        Err(f) => {
            if !f.message.is_empty() {
                // The agent's refusal quotes what the caller sent: shown, not sent (§12).
                eprintln!("outlivectl: {}", render::clean_lines(&f.message));
            }
            f.status
        }
    }
}
