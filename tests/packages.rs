//! Packaging (issue "Ship it"): man pages generated from the clap definitions and the key table
//! render with `man -l` and without groff warnings; completions load in bash and complete; the
//! built .deb and .rpm hold what they must, and their maintainer scripts parse, carry no
//! unexpanded macro (`%`) and no leftover `#DEBHELPER#`. The packages are built by `make deb`
//! and `make rpm` (part of `make test`); installing the .deb is an end-to-end test
//! (box_e2e.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{outlivectl, require, require_tools, run};

fn generate_man() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let (code, out, err) = run(Command::new(outlivectl()).arg("generate-man").arg(d.path()));
    assert_eq!(code, 0, "generate-man: {out}{err}");
    d
}

fn pages(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sec in ["man1", "man5", "man8"] {
        for e in std::fs::read_dir(dir.join(sec)).unwrap().flatten() {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

fn render(page: &Path) -> String {
    let (code, out, err) = run(Command::new("man")
        .env("MANWIDTH", "100")
        .arg("-l")
        .arg(page));
    assert_eq!(code, 0, "man -l {}: {err}", page.display());
    assert!(err.trim().is_empty(), "man -l {}: {err}", page.display());
    out
}

#[test]
fn man_pages_render_without_warnings_and_document_every_command_and_key() {
    if !require_tools(&["man", "groff"]) {
        return;
    }
    let d = generate_man();
    let all = pages(d.path());
    let names: Vec<String> = all
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for must in ["outlived.8", "outlivectl.1", "outlive.toml.5"] {
        assert!(names.contains(&must.to_string()), "no {must}: {names:?}");
    }
    // A page per visible command, named as outlivectl(1) lists them.
    use clap::CommandFactory;
    let ctl = outlive::cli::Outlivectl::command();
    let top = render(&d.path().join("man1/outlivectl.1"));
    for sub in ctl.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = format!("outlivectl-{}.1", sub.get_name());
        assert!(names.contains(&page), "no page {page}");
        assert!(
            top.contains(&format!("outlivectl-{}(1)", sub.get_name())),
            "outlivectl(1) does not list {page}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("generate-man")),
        "the hidden packaging command has no page"
    );
    for p in &all {
        let text = render(p);
        assert!(text.contains("NAME"), "{}: no NAME", p.display());
        // groff itself, with every warning on: nothing to say.
        let (code, _, err) = run(Command::new("groff")
            .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
            .arg(p));
        assert!(
            code == 0 && err.trim().is_empty(),
            "groff warns on {}: {err}",
            p.display()
        );
    }
    let daemon = render(&d.path().join("man8/outlived.8"));
    for must in [
        "--check-config",
        "--user",
        "--no-bus",
        "SIGHUP",
        "EXIT STATUS",
        "78",
        "/etc/outlive/outlive.toml",
        "outlivectl(1)",
    ] {
        assert!(daemon.contains(must), "outlived(8) lacks {must}:\n{daemon}");
    }
    let enqueue = render(&d.path().join("man1/outlivectl-enqueue.1"));
    for must in ["--run-id", "--evidence", "EXAMPLES"] {
        assert!(enqueue.contains(must), "outlivectl-enqueue(1) lacks {must}");
    }
    // outlive.toml(5): every SPEC §9 key under its table, with its default and range.
    let conf = render(&d.path().join("man5/outlive.toml.5"));
    let flat = conf.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut section = String::new();
    for k in outlive::config::documented_keys() {
        if !k.section.is_empty() && k.section != section {
            section = k.section.to_string();
            assert!(
                conf.contains(&format!("[{section}]")),
                "outlive.toml(5) has no [{section}]"
            );
        }
        let line = format!("{} = {}", k.name, k.default_toml);
        assert!(
            conf.lines().any(|l| l.trim() == line),
            "outlive.toml(5) lacks `{line}`"
        );
        let expects = format!("Expects {}", k.expects);
        assert!(flat.contains(&expects), "{}: no `{expects}`", k.name);
    }
}

#[test]
fn bash_completion_loads_and_completes_commands_and_flags() {
    if !require_tools(&["bash"]) {
        return;
    }
    let script = format!(
        r#"set -e
source <("{ctl}" completions bash)
complete -p outlivectl
COMP_WORDS=(outlivectl en); COMP_CWORD=1; COMP_LINE="outlivectl en"; COMP_POINT=${{#COMP_LINE}}
_outlivectl outlivectl en outlivectl
echo "words: ${{COMPREPLY[*]}}"
COMP_WORDS=(outlivectl pause --ki); COMP_CWORD=2; COMP_LINE="outlivectl pause --ki"; COMP_POINT=${{#COMP_LINE}}
_outlivectl outlivectl --ki pause
echo "flags: ${{COMPREPLY[*]}}"
"#,
        ctl = outlivectl()
    );
    let (code, out, err) = run(Command::new("bash").args(["-c", &script]));
    assert_eq!(code, 0, "bash completion: {out}{err}");
    assert!(out.contains("-F _outlivectl outlivectl"), "{out}");
    let words = out.lines().find(|l| l.starts_with("words:")).unwrap();
    assert!(words.contains("enqueue"), "{words}");
    let flags = out.lines().find(|l| l.starts_with("flags:")).unwrap();
    assert!(flags.contains("--kind"), "{flags}");
    for shell in ["zsh", "fish"] {
        let (code, out, _) = run(Command::new(outlivectl()).args(["completions", shell]));
        assert_eq!(code, 0);
        assert!(out.contains("enqueue"), "{shell} completion lacks enqueue");
    }
    let (code, _, err) = run(Command::new(outlivectl()).args(["completions", "tcsh"]));
    assert_eq!(code, 2, "an unknown shell is a usage error");
    assert!(err.contains("possible values"), "{err}");
}

fn deb() -> Option<PathBuf> {
    common::built_package("debian", "outlive_", ".deb")
}

const PAYLOAD: &[&str] = &[
    "/usr/sbin/outlived",
    "/usr/bin/outlivectl",
    "/usr/lib/systemd/system/outlived.service",
    "/usr/share/dbus-1/system.d/org.outlive.Agent1.conf",
    "/usr/lib/systemd/catalog/outlive.catalog",
    "/usr/lib/sysusers.d/outlive.conf",
    "/etc/outlive/outlive.toml",
    "/usr/share/man/man8/outlived.8.gz",
    "/usr/share/man/man1/outlivectl.1.gz",
    "/usr/share/man/man5/outlive.toml.5.gz",
    "/usr/share/bash-completion/completions/outlivectl",
    "/usr/share/doc/outlive/prometheus/outlive.rules.yml",
];

#[test]
fn deb_holds_the_agent_and_its_scripts_keep_debhelper_fragments() {
    if !require_tools(&["dpkg-deb"]) {
        return;
    }
    let Some(deb) = deb() else {
        require(false, "target/debian/outlive_*.deb (run `make deb`)");
        return;
    };
    let (code, list, err) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    assert_eq!(code, 0, "{err}");
    for p in PAYLOAD {
        assert!(
            list.lines().any(|l| l.ends_with(&format!(".{p}"))),
            "the .deb lacks {p}"
        );
    }
    assert!(
        !list.contains("system-services"),
        "no D-Bus activation file (it would restart a stopped agent)"
    );
    let ctl = tempfile::tempdir().unwrap();
    let (code, _, err) = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    assert_eq!(code, 0, "{err}");
    let read = |n: &str| std::fs::read_to_string(ctl.path().join(n)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/outlive/outlive.toml");
    let control = read("control");
    for dep in ["systemd", "dbus-system-bus", "libc6"] {
        assert!(control.contains(dep), "Depends lacks {dep}:\n{control}");
    }
    for script in ["postinst", "prerm", "postrm"] {
        let text = read(script);
        assert!(!text.is_empty(), "no {script}");
        assert!(!text.contains("#DEBHELPER#"), "{script}: token left");
        let (code, _, err) = run(Command::new("sh").arg("-n").arg(ctl.path().join(script)));
        assert_eq!(code, 0, "{script} does not parse: {err}");
    }
    let postinst = read("postinst");
    for must in [
        "systemd-sysusers",
        "deb-systemd-helper enable outlived.service",
        "deb-systemd-invoke $_dh_action outlived.service",
        "ReloadConfig",
        "journalctl --update-catalog",
    ] {
        assert!(postinst.contains(must), "postinst lacks {must}");
    }
    // The group exists before the unit starts: sysusers comes first.
    assert!(
        postinst.find("systemd-sysusers").unwrap() < postinst.find("deb-systemd-invoke").unwrap()
    );
    assert!(read("prerm").contains("deb-systemd-invoke stop outlived.service"));
    let postrm = read("postrm");
    assert!(postrm.contains("rm -rf /var/lib/outlive /run/outlive"));
    assert!(postrm.contains("deb-systemd-helper purge outlived.service"));
}

#[test]
fn rpm_scriptlets_are_literal_and_the_payload_is_complete() {
    if !require_tools(&["rpm"]) {
        return;
    }
    let Some(rpm) = common::built_package("generate-rpm", "outlive-", ".rpm") else {
        require(false, "target/generate-rpm/outlive-*.rpm (run `make rpm`)");
        return;
    };
    let q = |args: &[&str]| {
        let (code, out, err) = run(Command::new("rpm").arg("-qp").args(args).arg(&rpm));
        assert_eq!(code, 0, "rpm -qp {args:?}: {err}");
        out
    };
    let scripts = q(&["--scripts"]);
    // cargo-generate-rpm expands no macros: a `%` would reach the shell as is.
    assert!(
        !scripts.contains('%'),
        "unexpanded macro in the scriptlets:\n{scripts}"
    );
    let mut bodies = std::collections::HashMap::new();
    let mut cur = String::new();
    for line in scripts.lines() {
        if let Some(name) = line.strip_suffix(" scriptlet:") {
            cur = name.to_string();
            bodies.insert(cur.clone(), String::new());
        } else if let Some(b) = bodies.get_mut(&cur) {
            b.push_str(line);
            b.push('\n');
        }
    }
    for s in ["postinstall", "preuninstall", "postuninstall"] {
        let body = bodies
            .get(s)
            .unwrap_or_else(|| panic!("no {s} scriptlet:\n{scripts}"));
        let (code, _, err) = run(Command::new("sh").args(["-n", "-c", body]));
        assert_eq!(code, 0, "{s} does not parse: {err}");
    }
    assert!(bodies["postinstall"].contains("systemd-sysusers"));
    assert!(bodies["postinstall"].contains("preset outlived.service"));
    assert!(bodies["postinstall"].contains("journalctl --update-catalog"));
    assert!(bodies["preuninstall"].contains("disable --now outlived.service"));
    assert!(bodies["postuninstall"].contains("try-restart outlived.service"));
    let files = q(&["-l"]);
    for p in PAYLOAD {
        assert!(files.lines().any(|l| l == *p), "the .rpm lacks {p}");
    }
    let config = q(&["-c"]);
    assert_eq!(config.trim(), "/etc/outlive/outlive.toml");
    let flags = q(&["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    assert!(
        flags
            .lines()
            .any(|l| l.starts_with("/etc/outlive/outlive.toml ") && l.contains('n')),
        "the configuration must be %config(noreplace):\n{flags}"
    );
    let requires = q(&["-R"]);
    for r in ["systemd", "dbus"] {
        assert!(
            requires.lines().any(|l| l.trim() == r),
            "Requires lacks {r}"
        );
    }
}
