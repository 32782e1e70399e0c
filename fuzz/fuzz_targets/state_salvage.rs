//! SPEC Q-15 as amended (§12): the queue's state file, as found on disk, loaded through
//! salvage: never a panic; what loads serialises and parses back to itself strictly (a state
//! the agent writes is always readable whole); new ids stay above every id in the file; a
//! pause or global stop that could not be read leaves the queue paused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outlive::queue::store::{State, id_floor_ms, parse, salvage};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = salvage(data, 1_000) else {
        return;
    };
    let bytes = serde_json::to_vec(&s.state).expect("a salvaged state serialises");
    let again: State = parse(&bytes).expect("a salvaged state reads back whole");
    assert_eq!(again, s.state);
    assert!(s.state.last_id_ms >= id_floor_ms(data));
    if s.paused_because.is_some() {
        assert!(
            s.state.pause.is_some(),
            "an unreadable pause or stop fails closed"
        );
    }
    let mut ids: Vec<&str> = s.state.entries.iter().map(|e| e.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        s.state.entries.len(),
        "no two entries share an id"
    );
});
