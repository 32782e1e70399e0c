//! SPEC Q-15: the queue's state file, as found on disk, parses or is refused with a reason; it
//! never panics the agent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = outlive::queue::store::parse(data);
});
