//! The shipped files (DESIGN §2, §2a): the unit passes `systemd-analyze verify` and its
//! exposure score is at most 2.0; `make install` honours DESTDIR and PREFIX and always puts the
//! D-Bus policy under /usr/share; the policy and the launchd plist say what they must; and the
//! facts layer never spawns a program.

mod common;

use std::path::Path;
use std::process::Command;

use common::{outlivectl, outlived, repo, require_tools, run};

fn install(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let (code, out, err) = run(Command::new("make")
        .current_dir(repo())
        .args(["-s", "install"])
        .arg(format!("PREFIX={prefix}"))
        .arg(format!("DESTDIR={}", d.path().display()))
        .arg(format!("OUTLIVED={}", outlived()))
        .arg(format!("OUTLIVECTL={}", outlivectl())));
    assert_eq!(code, 0, "make install:\n{out}\n{err}");
    d
}

#[test]
fn makefile_install_honours_destdir_and_prefix() {
    if !require_tools(&["make"]) {
        return;
    }
    for (prefix, sbin) in [
        ("/usr", "/usr/sbin/outlived"),
        ("/usr/local", "/usr/local/sbin/outlived"),
    ] {
        let d = install(prefix);
        let root = d.path();
        assert!(
            root.join(sbin.trim_start_matches('/')).is_file(),
            "{prefix}: {sbin}"
        );
        assert!(
            root.join(format!("{}/bin/outlivectl", prefix.trim_start_matches('/')))
                .is_file()
        );
        let unit = std::fs::read_to_string(root.join(format!(
            "{}/lib/systemd/system/outlived.service",
            prefix.trim_start_matches('/')
        )))
        .unwrap();
        assert!(
            unit.lines().any(|l| l == format!("ExecStart={sbin}")),
            "{prefix}: ExecStart must name the installed binary"
        );
        // Whatever the prefix: the bus reads no other place.
        assert!(
            root.join("usr/share/dbus-1/system.d/org.outlive.Agent1.conf")
                .is_file(),
            "{prefix}"
        );
        assert!(
            !root.join("usr/local/share/dbus-1").exists(),
            "{prefix}: policy under the prefix is never read"
        );
        // The journal catalog, where journalctl looks for it under this prefix.
        assert!(
            root.join(format!(
                "{}/lib/systemd/catalog/outlive.catalog",
                prefix.trim_start_matches('/')
            ))
            .is_file(),
            "{prefix}: catalog"
        );
        // No bus activation file (activation would restart a stopped agent).
        let activation = walk(root)
            .into_iter()
            .any(|p| p.to_string_lossy().contains("system-services"));
        assert!(
            !activation,
            "{prefix}: a D-Bus activation file was installed"
        );
        // Man pages, completions, the group's sysusers.d file, and the configuration (under
        // /etc whatever the prefix: the agent reads no other place).
        let under = |rel: &str| root.join(format!("{}/{rel}", prefix.trim_start_matches('/')));
        for rel in [
            "share/man/man8/outlived.8",
            "share/man/man1/outlivectl.1",
            "share/man/man1/outlivectl-enqueue.1",
            "share/man/man5/outlive.toml.5",
            "share/bash-completion/completions/outlivectl",
            "share/zsh/site-functions/_outlivectl",
            "share/fish/vendor_completions.d/outlivectl.fish",
            "lib/sysusers.d/outlive.conf",
        ] {
            assert!(under(rel).is_file(), "{prefix}: {rel}");
        }
        let conf = root.join("etc/outlive/outlive.toml");
        assert_eq!(
            std::fs::read_to_string(&conf).unwrap(),
            outlive::config::commented_default_file()
        );
        // A second install keeps an operator's configuration.
        std::fs::write(&conf, "[queue]\ndry_run = false\n").unwrap();
        let (code, out, err) = run(Command::new("make")
            .current_dir(repo())
            .args(["-s", "install"])
            .arg(format!("PREFIX={prefix}"))
            .arg(format!("DESTDIR={}", root.display()))
            .arg(format!("OUTLIVED={}", outlived()))
            .arg(format!("OUTLIVECTL={}", outlivectl())));
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            std::fs::read_to_string(&conf).unwrap(),
            "[queue]\ndry_run = false\n",
            "{prefix}: make install overwrote the configuration"
        );
        // uninstall removes what install put there, and keeps the configuration.
        let (code, out, err) = run(Command::new("make")
            .current_dir(repo())
            .args(["-s", "uninstall"])
            .arg(format!("PREFIX={prefix}"))
            .arg(format!("DESTDIR={}", root.display())));
        assert_eq!(code, 0, "{out}{err}");
        let left: Vec<_> = walk(root)
            .into_iter()
            .filter(|p| p.is_file() && *p != conf)
            .collect();
        assert!(left.is_empty(), "{prefix}: uninstall left {left:?}");
        assert!(conf.is_file());
    }
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.path());
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn unit_verifies_clean_and_exposure_is_at_most_2_0() {
    if !require_tools(&["systemd-analyze", "make"]) {
        return;
    }
    let d = install("/usr");
    let installed =
        std::fs::read_to_string(d.path().join("usr/lib/systemd/system/outlived.service")).unwrap();
    // verify checks that ExecStart exists on this machine: point it at the binary this run built.
    let unit = installed
        .lines()
        .map(|l| {
            if l.starts_with("ExecStart=") {
                format!("ExecStart={}", outlived())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = d.path().join("outlived.service");
    std::fs::write(&path, unit + "\n").unwrap();
    let (code, out, err) = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));
    assert_eq!(code, 0, "verify failed:\n{out}{err}");
    assert!(
        err.trim().is_empty() && out.trim().is_empty(),
        "verify reported:\n{out}{err}"
    );

    let (code, out, err) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path));
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{out}");
}

#[test]
fn unit_is_the_one_design_describes() {
    let unit = std::fs::read_to_string(repo().join("systemd/outlived.service")).unwrap();
    let has = |l: &str| unit.lines().any(|x| x.trim() == l);
    for l in [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartSec=5s",
        "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_CHOWN CAP_SETUID CAP_SETGID",
        "PrivateMounts=yes",
        "MemoryMax=64M",
        "TasksMax=64",
        "RestrictAddressFamilies=AF_UNIX",
        "ProtectHome=read-only",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=outlive",
        "StateDirectoryMode=0700",
        "RuntimeDirectory=outlive",
        "RuntimeDirectoryPreserve=yes",
        "UMask=0077",
    ] {
        assert!(has(l), "missing {l}");
    }
    // What the agent needs may not be denied; each omission is explained in a comment.
    for (directive, why) in [
        ("PrivateTmp=", "No PrivateTmp="),
        ("ProcSubset=", "No ProcSubset=pid"),
        ("ProtectProc=", "ProtectProc=invisible"),
        ("PrivateUsers=", "No PrivateUsers="),
        ("ProtectHostname=", "No ProtectHostname="),
        ("User=", "a non-root agent would need polkit"),
        ("DynamicUser=", "DynamicUser= cannot own a bus name"),
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(directive)),
            "{directive} must not be set"
        );
        assert!(
            unit.contains(why),
            "the omission of {directive} is not explained"
        );
    }
}

#[test]
fn dbus_policy_lets_only_root_own_the_name_and_never_grants_getmachineid() {
    let p = std::fs::read_to_string(repo().join("systemd/org.outlive.Agent1.conf")).unwrap();
    assert!(
        p.contains(r#"<policy user="root">"#) && p.contains(r#"<allow own="org.outlive.Agent1"/>"#)
    );
    assert_eq!(
        p.matches("<allow own=").count(),
        1,
        "only root may own the name"
    );
    assert!(p.contains(r#"<policy group="outlive">"#));
    assert!(
        !p.contains(r#"send_member="GetMachineId""#),
        "GetMachineId would leak the raw machine id"
    );
    for m in [
        "GetHostFacts",
        "ClassifyPath",
        "GetGuards",
        "ReportGuard",
        "List",
    ] {
        assert!(
            p.contains(&format!(r#"send_member="{m}""#)),
            "everyone may call {m}"
        );
    }
    for m in ["Enqueue", "Cancel", "Reevaluate", "StopAll", "Pause"] {
        assert!(
            !p.contains(&format!(r#"send_member="{m}""#)),
            "{m} must not be open to everyone"
        );
    }
}

#[test]
fn launchd_plist_has_the_keys_launchd_needs() {
    let text = std::fs::read_to_string(repo().join("launchd/org.outlive.outlived.plist")).unwrap();
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("<key>")
                .and_then(|r| r.strip_suffix("</key>"))
        })
        .collect();
    for k in [
        "Label",
        "ProgramArguments",
        "RunAtLoad",
        "KeepAlive",
        "SuccessfulExit",
        "ThrottleInterval",
        "ProcessType",
        "ExitTimeOut",
        "AbandonProcessGroup",
        "StandardOutPath",
        "StandardErrorPath",
    ] {
        assert!(keys.contains(&k), "plist lacks {k}");
    }
    assert!(text.contains("<string>org.outlive.outlived</string>"));
    assert!(
        text.contains("<key>SuccessfulExit</key>\n    <false/>"),
        "restart unless the exit was orderly"
    );
    assert!(
        text.contains("<key>AbandonProcessGroup</key>\n  <true/>"),
        "spawned runs survive the agent"
    );
    if common::have("python3") {
        let (code, _, err) = run(Command::new("python3")
            .args(["-c", "import plistlib,sys; d=plistlib.load(open(sys.argv[1],'rb')); assert d['Label']=='org.outlive.outlived'; assert d['KeepAlive']['SuccessfulExit'] is False"])
            .arg(repo().join("launchd/org.outlive.outlived.plist")));
        assert_eq!(code, 0, "plist does not parse: {err}");
    }
}

/// `make install` on macOS (the Makefile's Darwin branch, files only: run here with
/// UNAME=Darwin and a DESTDIR): the plist lands in /Library/LaunchDaemons naming the installed
/// binary, the log directory exists, and nothing of systemd is installed.
#[test]
fn makefile_install_on_macos_installs_the_launchd_job() {
    if !require_tools(&["make", "python3"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (code, out, err) = run(Command::new("make")
        .current_dir(repo())
        .args(["-s", "install", "UNAME=Darwin", "PREFIX=/opt/outlive"])
        .arg(format!("DESTDIR={}", d.path().display()))
        .arg(format!("OUTLIVED={}", outlived()))
        .arg(format!("OUTLIVECTL={}", outlivectl())));
    assert_eq!(code, 0, "make install (Darwin):\n{out}\n{err}");
    let plist = d
        .path()
        .join("Library/LaunchDaemons/org.outlive.outlived.plist");
    let (code, out, err) = run(Command::new("python3")
        .args([
            "-c",
            "import plistlib,sys,json; d=plistlib.load(open(sys.argv[1],'rb')); print(json.dumps(d))",
        ])
        .arg(&plist));
    assert_eq!(code, 0, "the installed plist does not parse: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Label"], "org.outlive.outlived");
    assert_eq!(v["ProgramArguments"][0], "/opt/outlive/sbin/outlived");
    assert_eq!(v["RunAtLoad"], true);
    assert_eq!(v["KeepAlive"]["SuccessfulExit"], false);
    assert_eq!(v["ProcessType"], "Background");
    assert_eq!(v["AbandonProcessGroup"], true);
    assert!(v["ThrottleInterval"].as_u64().is_some_and(|t| t >= 1));
    assert!(v["ExitTimeOut"].as_u64().is_some_and(|t| t >= 10));
    let log = v["StandardErrorPath"].as_str().unwrap();
    assert!(
        d.path()
            .join(Path::new(log).parent().unwrap().strip_prefix("/").unwrap())
            .is_dir(),
        "the log directory {log} is created"
    );
    assert!(d.path().join("opt/outlive/sbin/outlived").is_file());
    assert!(
        d.path()
            .join("opt/outlive/share/man/man8/outlived.8")
            .is_file()
    );
    let systemd = walk(d.path())
        .into_iter()
        .any(|p| p.to_string_lossy().contains("systemd") || p.to_string_lossy().contains("dbus-1"));
    assert!(!systemd, "no systemd or D-Bus files on macOS");
}

#[test]
fn h1_h3_facts_never_spawn_a_program() {
    // SPEC §1: facts come from the kernel, never from df, findmnt, mount, hostname or stat.
    for f in walk(&repo().join("src/facts")) {
        if f.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&f).unwrap();
            for banned in [
                "process::Command",
                "Command::new",
                "libc::fork",
                "posix_spawn",
                "execv",
            ] {
                assert!(!text.contains(banned), "{} uses {banned}", f.display());
            }
        }
    }
}

#[test]
fn s9_packaged_default_configuration_is_generated_from_the_key_table() {
    let shipped = std::fs::read_to_string(repo().join("packaging/outlive.toml")).unwrap();
    assert_eq!(
        shipped,
        outlive::config::commented_default_file(),
        "packaging/outlive.toml is stale: regenerate it with `cargo run --bin outlived -- --print-default-config > packaging/outlive.toml`"
    );
    // Every key of SPEC §9 appears, commented out at its default.
    for k in outlive::config::KEYS {
        let name = k.key.rsplit('.').next().unwrap();
        assert!(
            shipped
                .lines()
                .any(|l| l.starts_with(&format!("#{name} = "))),
            "{} missing",
            k.key
        );
    }
}

/// §12 G-6: the catalog entry of the disabled-queue alert names every reason code the queue
/// can be disabled with, each with what to do; the generic notice names the new notices
/// that need an operator.
#[test]
fn g6_the_catalog_lists_every_reason_a_queue_is_disabled_for() {
    let text = std::fs::read_to_string(repo().join("systemd/outlive.catalog")).unwrap();
    let entry = |id: &str| -> String {
        text.split("\n-- ")
            .find(|c| c.starts_with(id))
            .unwrap_or_else(|| panic!("no entry {id}"))
            .to_string()
    };
    let disabled = entry(outlive::audit::Alert::QueueDisabled.message_id());
    let mut codes: Vec<&str> = outlive::queue::lock::LockReason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    codes.push("persist-failed");
    for c in codes {
        assert!(
            disabled.contains(&format!("- {c}:")),
            "the queue-disabled entry does not explain {c}"
        );
        assert!(
            outlive::posture::rows::REASON_CODES.contains(&c),
            "{c} is not in the closed vocabulary"
        );
    }
    let notice = entry(outlive::audit::Alert::QueueNotice.message_id());
    for kind in [
        "manager-unreachable",
        "state-salvaged",
        "state-corrupt",
        "audit-write-failed",
    ] {
        assert!(
            notice.contains(kind),
            "the generic notice does not explain {kind}"
        );
    }
}

/// X-2: the catalog has an entry for every MESSAGE_ID, each with Subject, Defined-By, Support
/// and a body saying what to do, and journalctl compiles it.
#[test]
fn x2_the_catalog_explains_every_message_id_and_journalctl_compiles_it() {
    let text = std::fs::read_to_string(repo().join("systemd/outlive.catalog")).unwrap();
    let mut entries: std::collections::HashMap<String, String> = Default::default();
    for chunk in text.split("\n-- ").skip(1) {
        let (id, body) = chunk.split_once('\n').unwrap();
        entries.insert(id.trim().to_string(), body.to_string());
    }
    for a in outlive::audit::Alert::ALL {
        let id = a.message_id();
        let body = entries
            .get(id)
            .unwrap_or_else(|| panic!("no catalog entry for {a:?} ({id})"));
        for h in ["Subject: ", "Defined-By: outlive", "Support: "] {
            assert!(body.contains(h), "{id}: no {h}");
        }
        let prose = body.split("\n\n").skip(1).collect::<Vec<_>>().join(" ");
        assert!(
            prose.split_whitespace().count() >= 20,
            "{id}: the body is too thin"
        );
    }
    assert_eq!(
        entries.len(),
        outlive::audit::Alert::ALL.len(),
        "an entry for an unknown id"
    );
    if !require_tools(&["journalctl"]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("usr/lib/systemd/catalog");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        repo().join("systemd/outlive.catalog"),
        dir.join("outlive.catalog"),
    )
    .unwrap();
    let r = root.path().to_str().unwrap();
    let (code, _, err) =
        run(Command::new("journalctl").args([&format!("--root={r}"), "--update-catalog"]));
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        run(Command::new("journalctl").args([&format!("--root={r}"), "--list-catalog"]));
    assert_eq!(code, 0, "{err}");
    for a in outlive::audit::Alert::ALL {
        assert!(
            out.contains(a.message_id()),
            "journalctl did not compile {:?}:\n{out}",
            a
        );
    }
}
