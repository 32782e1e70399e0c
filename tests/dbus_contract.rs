//! The D-Bus contract is checked in: `docs/dbus/<interface>.xml`, one introspection file
//! per interface. The running agent's introspection must equal them (comments aside), so a
//! change of the API changes the file in the same commit; and `outlivectl`'s hand-written
//! proxies (`src/cli/client.rs`) must call only methods the files declare, with their
//! signatures.
//!
//! `OUTLIVE_BLESS=1` writes the live introspection into files that are missing (a new
//! interface); a file that exists is never overwritten, since it carries the comments a reader
//! needs.

mod common;

use std::collections::BTreeMap;

use common::bus::PrivateBus;
use common::{TestSocket, repo, require_root, require_tools};

const T: std::time::Duration = std::time::Duration::from_secs(15);

/// Each object and the interface of ours it serves.
const OBJECTS: &[(&str, &str)] = &[
    ("/org/outlive/Agent1", "org.outlive.Agent1"),
    ("/org/outlive/Agent1/Guards", "org.outlive.Guards1"),
    (
        "/org/outlive/Agent1/ResumeQueue",
        "org.outlive.ResumeQueue1",
    ),
    ("/org/outlive/Agent1/Runs", "org.outlive.Runs1"),
];

/// XML without comments and without the white space between tags.
fn canonical(xml: &str) -> String {
    let mut s = String::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<!--") {
        s.push_str(&rest[..i]);
        let end = rest[i..]
            .find("-->")
            .map(|j| i + j + 3)
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    s.push_str(rest);
    let mut out = String::new();
    for part in s.split('<').skip(1) {
        let (tag, text) = part.split_once('>').unwrap_or((part, ""));
        out.push('<');
        out.push_str(&tag.split_whitespace().collect::<Vec<_>>().join(" "));
        out.push('>');
        out.push_str(text.trim());
    }
    out
}

/// The `<interface name="…">…</interface>` element for `name`, canonical.
fn interface(xml: &str, name: &str) -> Option<String> {
    let c = canonical(xml);
    let start = c.find(&format!("<interface name=\"{name}\">"))?;
    let end = c[start..].find("</interface>")? + start + "</interface>".len();
    Some(c[start..end].to_string())
}

fn doc_file(iface: &str) -> std::path::PathBuf {
    repo().join("docs/dbus").join(format!("{iface}.xml"))
}

#[test]
fn canonical_form_ignores_comments_and_layout() {
    let a = "<node>\n  <!-- the agent -->\n  <interface name=\"x.Y\">\n    <method name=\"A\"/>\n  </interface>\n</node>";
    let b = "<node><interface  name=\"x.Y\"><method name=\"A\"/></interface></node>";
    assert_eq!(canonical(a), canonical(b));
    assert_eq!(
        interface(a, "x.Y").unwrap(),
        "<interface name=\"x.Y\"><method name=\"A\"/></interface>"
    );
    assert_ne!(canonical(a), canonical(&b.replace("\"A\"", "\"B\"")));
}

#[test]
fn x1_live_introspection_equals_docs_dbus() {
    if !(require_root("owning org.outlive.Agent1 needs root under the shipped policy")
        && require_tools(&["dbus-daemon", "busctl"]))
    {
        return;
    }
    let bus = PrivateBus::start();
    let (n, j) = (TestSocket::notify(), TestSocket::journal());
    let _a = common::bus_agent(&bus, &n, &j, "");
    n.wait_for("READY=1", T, |d| d.has("READY", "1"));
    let bless = std::env::var("OUTLIVE_BLESS").is_ok_and(|v| v == "1");
    let mut problems = Vec::new();
    for (path, iface) in OBJECTS {
        let (code, xml, err) = bus.busctl(&[
            "introspect",
            "--xml-interface",
            "org.outlive.Agent1",
            path,
            iface,
        ]);
        assert_eq!(code, 0, "introspect {path}: {err}");
        let live = interface(&xml, iface).unwrap_or_else(|| panic!("{path} lacks {iface}"));
        let file = doc_file(iface);
        let Ok(text) = std::fs::read_to_string(&file) else {
            if bless {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &xml).unwrap();
                eprintln!("wrote {}", file.display());
            } else {
                problems.push(format!(
                    "{} is missing (OUTLIVE_BLESS=1 writes it from the agent)",
                    file.display()
                ));
            }
            continue;
        };
        let want = interface(&text, iface)
            .unwrap_or_else(|| panic!("{} declares no {iface}", file.display()));
        if live != want {
            problems.push(format!(
                "{iface}: the running agent and {} differ; change the file with the API.\n  live: {live}\n  file: {want}",
                file.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A method of the contract: its in and out signatures.
#[derive(Debug, PartialEq, Eq)]
struct Method {
    ins: String,
    outs: String,
}

/// The methods the checked-in file declares for `iface`.
fn declared(iface: &str) -> BTreeMap<String, Method> {
    let text = std::fs::read_to_string(doc_file(iface)).unwrap();
    let c = interface(&text, iface).unwrap();
    let mut out = BTreeMap::new();
    for m in c.split("<method ").skip(1) {
        let head = m.split('>').next().unwrap();
        let name = attr(head, "name").unwrap();
        let body = if head.ends_with('/') {
            ""
        } else {
            &m[..m.find("</method>").unwrap()]
        };
        let (mut ins, mut outs) = (String::new(), String::new());
        for a in body.split("<arg ").skip(1) {
            let a = a.split('>').next().unwrap();
            let ty = attr(a, "type").unwrap();
            if attr(a, "direction").as_deref() == Some("out") {
                outs.push_str(&ty);
            } else {
                ins.push_str(&ty);
            }
        }
        out.insert(name, Method { ins, outs });
    }
    out
}

/// The value of `name="…"` (or, in Rust source, `name = "…"`) in `tag`.
fn attr(tag: &str, name: &str) -> Option<String> {
    let at = [format!(" {name}=\""), format!("{name} = \"")]
        .iter()
        .find_map(|p| tag.find(p.as_str()).map(|i| i + p.len()))
        .or_else(|| {
            tag.strip_prefix(&format!("{name}=\""))
                .map(|_| name.len() + 2)
        })?;
    Some(tag[at..at + tag[at..].find('"')?].to_string())
}

/// The D-Bus signature of a Rust type as the proxies use it.
fn signature(ty: &str) -> String {
    let ty = ty.trim();
    match ty {
        "()" => String::new(),
        "bool" => "b".into(),
        "u32" => "u".into(),
        "u64" => "t".into(),
        "&str" | "String" => "s".into(),
        "&[String]" => "as".into(),
        _ if ty.starts_with("HashMap<") => {
            let inner = &ty["HashMap<".len()..ty.len() - 1];
            let (k, v) = inner.split_once(',').unwrap();
            let v = match v.trim() {
                "OwnedVariant" | "Variant<'_>" => "v".to_string(),
                other => signature(other),
            };
            format!("a{{{}{v}}}", signature(k))
        }
        _ if ty.starts_with("Vec<") => format!("a{}", signature(&ty[4..ty.len() - 1])),
        _ if ty.starts_with('(') => ty[1..ty.len() - 1]
            .split(',')
            .map(signature)
            .collect::<Vec<_>>()
            .join(""),
        other => panic!("the contract test does not know the type {other}: add it"),
    }
}

/// `get_host_facts` ⇒ `GetHostFacts`, as zbus names a proxy's methods.
fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The proxies of `src/cli/client.rs`: interface ⇒ method ⇒ signatures.
fn proxies() -> BTreeMap<String, BTreeMap<String, Method>> {
    let src = std::fs::read_to_string(repo().join("src/cli/client.rs")).unwrap();
    let mut out = BTreeMap::new();
    for block in src.split("#[zbus::proxy(").skip(1) {
        let iface = attr(block, "interface").unwrap();
        let body = &block[block.find("pub trait").unwrap()..];
        let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
        let mut methods = BTreeMap::new();
        // One `fn …;` per method, whatever its layout.
        for f in body.split("fn ").skip(1) {
            let f: String = f[..f.find(';').unwrap()]
                .lines()
                .map(|l| l.split("//").next().unwrap().trim())
                .collect::<Vec<_>>()
                .join(" ");
            let name = &f[..f.find('(').unwrap()];
            let args = &f[f.find('(').unwrap() + 1..f.rfind(") ->").unwrap()];
            let ret = f[f.find("zbus::Result<").unwrap() + "zbus::Result<".len()..].trim_end();
            let ret = ret.strip_suffix('>').unwrap();
            let mut ins = String::new();
            let mut depth = 0;
            let mut cur = String::new();
            for ch in args.chars().chain(std::iter::once(',')) {
                match ch {
                    '<' | '(' => depth += 1,
                    '>' | ')' => depth -= 1,
                    ',' if depth == 0 => {
                        if let Some((_, ty)) = cur.split_once(':') {
                            ins.push_str(&signature(ty));
                        }
                        cur.clear();
                        continue;
                    }
                    _ => {}
                }
                cur.push(ch);
            }
            methods.insert(
                camel(name),
                Method {
                    ins,
                    outs: signature(ret),
                },
            );
        }
        out.insert(iface, methods);
    }
    out
}

#[test]
fn x1_outlivectl_proxies_call_what_docs_dbus_declares() {
    let all = proxies();
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        [
            "org.outlive.Agent1",
            "org.outlive.Guards1",
            "org.outlive.ResumeQueue1",
            "org.outlive.Runs1"
        ],
        "the proxies found in src/cli/client.rs"
    );
    let mut checked = 0;
    for (iface, methods) in &all {
        let contract = declared(iface);
        for (name, m) in methods {
            let Some(want) = contract.get(name) else {
                panic!(
                    "outlivectl calls {iface}.{name}, which docs/dbus/{iface}.xml does not declare"
                );
            };
            assert_eq!(
                m, want,
                "{iface}.{name}: the proxy's signature against the contract"
            );
            checked += 1;
        }
    }
    assert!(checked >= 16, "only {checked} proxy methods parsed");
}
