//! Man pages and shell completions, generated from the definitions the programs themselves use:
//! the clap definitions of `outlived` and `outlivectl` (clap_mangen, clap_complete) and the
//! configuration's key table for `outlive.toml(5)` (SPEC §9). `outlivectl completions SHELL`
//! prints a completion script; `make install` and the packages run the hidden
//! `outlivectl generate-man DIR`.

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use super::{Outlivectl, OutlivedArgs};

const MANUAL: &str = "outlive";

fn source() -> String {
    format!("outlive {}", env!("CARGO_PKG_VERSION"))
}

/// A page: its section ("1", "5", "8"), its file name and its roff text.
pub(crate) struct Page {
    pub section: &'static str,
    pub file: String,
    pub text: Vec<u8>,
}

fn man(cmd: clap::Command, section: &'static str) -> Man {
    Man::new(cmd)
        .section(section)
        .source(source())
        .manual(MANUAL)
        .date("")
}

/// A `.SH` section of `.TP` items (term in bold, then its text).
fn items(roff: &mut Roff, heading: &str, list: &[(&str, &str)]) {
    roff.control("SH", [heading]);
    for (term, text) in list {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

fn paragraph(roff: &mut Roff, heading: &str, text: &str) {
    roff.control("SH", [heading]);
    roff.text([roman(text)]);
}

fn see_also(roff: &mut Roff, refs: &[(&str, &str)]) {
    roff.control("SH", ["SEE ALSO"]);
    let mut parts = Vec::new();
    for (i, (name, sec)) in refs.iter().enumerate() {
        parts.push(bold(*name));
        let sep = if i + 1 < refs.len() { "), " } else { ")" };
        parts.push(roman(format!("({sec}{sep}")));
    }
    roff.text(parts);
}

fn render(m: &Man, extra: impl FnOnce(&mut Roff)) -> Vec<u8> {
    let mut out = Vec::new();
    m.render_title(&mut out).unwrap();
    m.render_name_section(&mut out).unwrap();
    m.render_synopsis_section(&mut out).unwrap();
    m.render_description_section(&mut out).unwrap();
    m.render_options_section(&mut out).unwrap();
    let mut roff = Roff::default();
    extra(&mut roff);
    roff.to_writer(&mut out).unwrap();
    out
}

const FILES: &[(&str, &str)] = &[
    (
        "/etc/outlive/outlive.toml",
        "The configuration; every key is optional (see outlive.toml(5)). User mode: \
         $XDG_CONFIG_HOME/outlive/outlive.toml.",
    ),
    (
        "/etc/outlive/guards.d/*.toml",
        "Drop-ins declaring external guards, each reported over D-Bus by the owner of its file: \
         regular files of at most 64 KiB, not writable by group or others; a key two files \
         declare stays with the root-owned one, else the one that held it.",
    ),
    (
        "/var/lib/outlive/",
        "The state directory: queue state, the host lock, the audit trail, continuations. Must be \
         host-local.",
    ),
    (
        "/run/outlive/",
        "The runtime directory: audit lines while the lock is not held, copies for revived runs, \
         posture-boot.json.",
    ),
];

/// Who may call what, and the limits every caller meets (SPEC X-1, §12 X-1 bounds), with the
/// figures the gate enforces.
fn callers() -> Vec<(String, String)> {
    use crate::publish::dbus::gate::{
        MAX_IN_FLIGHT, MAX_REPORT_OPTIONS_BYTES, MUTATION_BURST, MUTATIONS_PER_SEC, READ_BURST,
        READS_PER_SEC,
    };
    vec![
        (
            "Everyone".into(),
            format!(
                "may read: host facts, properties, List, GetGuards, the attention item, and \
                 ClassifyPath (the mount table only: their paths are not touched), and ListRuns \
                 (their own watched runs only). Others' runs show kinds, ids, states and counts \
                 only: no path, argv, environment, session or notice text. A run's own user may \
                 declare its evidence (SetEvidence). Unprivileged callers get {READS_PER_SEC} calls a second per uid, \
                 {READ_BURST} at once, on every method; ReportGuard options may have at most 8 \
                 entries and {MAX_REPORT_OPTIONS_BYTES} bytes."
            ),
        ),
        (
            "Members of outlive".into(),
            format!(
                "may also change the queue (enqueue their own runs, cancel, requeue, pause, \
                 resume, stop, drain, report quota, acknowledge notices) and start watched runs \
                 (outlivectl run, as themselves) and watch units from queue.allowed_units; \
                 stopping a watched run that is active is for its own user and root only; only \
                 root and members receive RunEnded: {MUTATIONS_PER_SEC} \
                 changes a second per uid, {MUTATION_BURST} at once. Their runs run as them, unit \
                 targets only from queue.allowed_units; ClassifyPath and the checks of their runs' \
                 paths use their own credentials, so a path they cannot reach reads denied or \
                 undecided whether it exists or not. A member who leaves the group, or whose unit \
                 no longer matches queue.allowed_units, has their waiting runs invalidated \
                 (not-authorized) at the next attempt."
            ),
        ),
        (
            "Root".into(),
            "may do all of it without rate limits, and alone may name another user (user; the \
             group defaults to that user's primary group, gid 0 only when named), Reevaluate, \
             and clear the lock."
                .into(),
        ),
        (
            "Refused".into(),
            format!(
                "Past a rate, or with {MAX_IN_FLIGHT} calls already in flight, a call is answered \
                 org.outlive.Error.Busy saying when to try again; an oversized argument \
                 org.outlive.Error.InvalidArgument naming it; a call the caller may not make \
                 org.outlive.Error.AccessDenied saying who may. Repeated identical refusals are \
                 counted in the audit log, one line per ten minutes."
            ),
        ),
    ]
}

fn outlived_page() -> Page {
    let m = man(OutlivedArgs::command(), "8");
    let text = render(&m, |r| {
        paragraph(
            r,
            "SERVICE",
            "Under systemd (outlived.service, Type=notify) the agent sends READY=1 once startup is \
             complete, STATUS= lines an operator reads in systemctl status, RELOADING=1 and READY=1 \
             around a reload, STOPPING=1 on SIGTERM, and STATUS= with ERRNO= before a fatal exit. \
             The watchdog is fed from its own thread only while every loop of the agent makes \
             progress; a wedged loop shows as STATUS=wedged and the agent asks systemd to restart \
             it (WATCHDOG=trigger). Under launchd the same monitor exits with status 70.",
        );
        items(
            r,
            "SIGNALS",
            &[
                (
                    "SIGTERM, SIGINT",
                    "Stop: finish the current step, release the lock, exit 0.",
                ),
                (
                    "SIGHUP",
                    "Reload the configuration (systemctl reload outlived). state_dir, runtime_dir \
                     and journal.socket take effect at the next start.",
                ),
            ],
        );
        let reasons: Vec<(&str, &str)> = crate::posture::rows::REASON_CODES
            .iter()
            .map(|c| (*c, crate::posture::rows::reason_help(c).unwrap_or_default()))
            .collect();
        paragraph(
            r,
            "WHEN A GUARD IS OFF",
            "A guard configured on that is not genuinely on reads off-runtime-divergent, with a reason \
             code from this closed list; systemctl status then starts with DEGRADED: and the journal \
             explains it (journalctl -x). outlivectl guards prints the same one line of what to do.",
        );
        items(r, "REASON CODES", &reasons);
        let who = callers();
        let who: Vec<(&str, &str)> = who.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        items(r, "WHO MAY DO WHAT", &who);
        items(r, "FILES", FILES);
        items(
            r,
            "ENVIRONMENT",
            &[
                (
                    "OUTLIVE_LOG",
                    "Diagnostic level: error, warn, info (default), debug, trace.",
                ),
                (
                    "STATE_DIRECTORY, RUNTIME_DIRECTORY",
                    "Set by systemd (StateDirectory=, RuntimeDirectory=); the defaults of state_dir \
                     and runtime_dir.",
                ),
                (
                    "NOTIFY_SOCKET, WATCHDOG_USEC",
                    "Set by systemd for Type=notify and WatchdogSec=.",
                ),
            ],
        );
        items(
            r,
            "EXIT STATUS",
            &[
                (
                    "0",
                    "Stopped on request, or --check-config found the configuration valid.",
                ),
                (
                    "1",
                    "A fatal start error (no machine id, the state directory unusable).",
                ),
                ("69", "The bus could not be reached."),
                ("70", "A loop wedged and no watchdog acted (launchd)."),
                ("75", "Another process owns org.outlive.Agent1."),
                ("77", "The bus policy refused the name org.outlive.Agent1."),
                (
                    "78",
                    "The configuration is invalid; the message names the key and its range.",
                ),
            ],
        );
        see_also(
            r,
            &[
                ("outlivectl", "1"),
                ("outlive.toml", "5"),
                ("systemd.service", "5"),
                ("journalctl", "1"),
            ],
        );
    });
    Page {
        section: "8",
        file: "outlived.8".into(),
        text,
    }
}

fn outlivectl_pages() -> Vec<Page> {
    let mut cmd = Outlivectl::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    let top = man(cmd.clone(), "1");
    let text = render(&top, |r| {
        r.control("SH", ["COMMANDS"]);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            r.control("TP", []);
            r.text([bold(format!("outlivectl-{}", sub.get_name())), roman("(1)")]);
            r.text([roman(
                sub.get_about().map(|a| a.to_string()).unwrap_or_default(),
            )]);
        }
        items(
            r,
            "EXIT STATUS",
            &[
                ("0", "Success."),
                (
                    "1",
                    "The agent or the host refused; the reason and what to do are printed.",
                ),
                ("2", "A usage error."),
                ("3", "The agent is unreachable (not running, or no bus)."),
            ],
        );
        let who = callers();
        let who: Vec<(&str, &str)> = who.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        items(r, "PERMISSIONS AND LIMITS", &who);
        r.control("SH", ["EXAMPLES"]);
        for ex in [
            "outlivectl status",
            "outlivectl enqueue --run-id agent-7 --unit agent@7.service --evidence active-subagent",
            "outlivectl pause --kind maintenance --reason \"disk swap\"",
            "outlivectl host --path /var/lib/outlive --json",
            "source <(outlivectl completions bash)",
        ] {
            r.control("IP", []);
            r.text([roman(ex)]);
        }
        see_also(r, &[("outlived", "8"), ("outlive.toml", "5")]);
    });
    pages.push(Page {
        section: "1",
        file: "outlivectl.1".into(),
        text,
    });
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("outlivectl-{}", sub.get_name());
        // The examples are the command's after-help text.
        let examples = sub.get_after_help().map(|a| {
            a.to_string()
                .trim_start_matches("Examples:")
                .trim()
                .to_string()
        });
        let m = man(sub.clone().display_name(name.clone()), "1");
        let text = render(&m, |r| {
            if let Some(a) = &examples {
                paragraph(r, "EXAMPLES", a);
            }
            see_also(r, &[("outlivectl", "1"), ("outlived", "8")]);
        });
        pages.push(Page {
            section: "1",
            file: format!("{name}.1"),
            text,
        });
    }
    pages
}

fn outlive_toml_page() -> Page {
    let mut r = Roff::default();
    r.control("TH", ["OUTLIVE.TOML", "5", "", source().as_str(), MANUAL]);
    // No hyphenation: key names, values and ranges are read literally.
    r.control("nh", []);
    r.control("SH", ["NAME"]);
    r.text([roman("outlive.toml - configuration of the outlive agent")]);
    r.control("SH", ["SYNOPSIS"]);
    r.text([bold("/etc/outlive/outlive.toml")]);
    r.control("br", []);
    r.text([
        italic("$XDG_CONFIG_HOME"),
        bold("/outlive/outlive.toml"),
        roman(" (user mode)"),
    ]);
    r.control("SH", ["DESCRIPTION"]);
    r.text([roman(
        "A TOML file read by outlived(8) at start and on reload (systemctl reload outlived). \
         Every key is optional and shown here with its default. An unknown key, a value of the \
         wrong type or out of range is an error naming the key and its range: outlived refuses \
         to start (exit 78) or, on reload, keeps the running configuration and says why. Check \
         a file with outlived --check-config --config FILE; outlived --print-default-config \
         prints this whole file, commented.",
    )]);
    let mut section = None;
    for k in crate::config::documented_keys() {
        if section != Some(k.section) {
            let heading = if k.section.is_empty() {
                "TOP-LEVEL KEYS".to_string()
            } else {
                format!("[{}]", k.section)
            };
            r.control("SH", [heading.as_str()]);
            section = Some(k.section);
        }
        r.control("TP", []);
        r.text([bold(k.name), roman(format!(" = {}", k.default_toml))]);
        let mut text = format!("{} Expects {}.", k.doc, k.expects);
        if k.next_start {
            text.push_str(" Takes effect at the next start, not on reload.");
        }
        r.text([roman(text)]);
    }
    items(&mut r, "FILES", &FILES[..2]);
    see_also(&mut r, &[("outlived", "8"), ("outlivectl", "1")]);
    let mut text = Vec::new();
    r.to_writer(&mut text).unwrap();
    Page {
        section: "5",
        file: "outlive.toml.5".into(),
        text,
    }
}

/// Every page: outlived(8), outlivectl(1) and one per command, outlive.toml(5).
pub(crate) fn man_pages() -> Vec<Page> {
    let mut pages = vec![outlived_page()];
    pages.extend(outlivectl_pages());
    pages.push(outlive_toml_page());
    pages
}

/// Write every page under `dir` as `man<section>/<file>`; returns the paths written.
pub(crate) fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for p in man_pages() {
        let d = dir.join(format!("man{}", p.section));
        std::fs::create_dir_all(&d)?;
        let path = d.join(&p.file);
        std::fs::write(&path, &p.text)?;
        written.push(path);
    }
    Ok(written)
}

/// The completion script of `outlivectl` for `shell`.
pub(crate) fn completion(shell: Shell) -> Vec<u8> {
    let mut cmd = Outlivectl::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "outlivectl", &mut out);
    out
}
