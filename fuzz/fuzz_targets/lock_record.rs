//! SPEC L-4 row 4: a lock record of any content parses or is "malformed"; a record that parses
//! serialises and parses back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outlive::queue::lock::LockRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = LockRecord::parse(data) {
        let again = LockRecord::parse(&r.to_bytes()).expect("a parsed record round-trips");
        assert_eq!(again, r);
    }
});
