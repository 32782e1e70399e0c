//! SPEC H-3: `/proc/self/mountinfo` parsing and classification never panic, whatever the
//! kernel (or a FUSE daemon naming its mount) writes; every line either parses or is skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outlive::facts::mountinfo::{MountTable, parse_line};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let table = MountTable::parse(&text);
    for line in text.lines() {
        let _ = parse_line(line);
    }
    // Looking paths up in whatever table came out.
    for p in ["/", "/var/lib/outlive", "/home/a b", "/proc/self"] {
        let _ = table.find(std::path::Path::new(p));
    }
});
