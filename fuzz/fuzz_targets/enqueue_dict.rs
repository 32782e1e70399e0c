//! SPEC: `Enqueue`'s a{sv} dictionary, as it arrives on the wire (little-endian D-Bus
//! encoding), decodes to a request or to `(key, why)`; never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use zbus::wire::serialized::{Context, Data};
use zbus::wire::{Endian, OwnedVariant};

fuzz_target!(|data: &[u8]| {
    let ctxt = Context::new(Endian::Little, 0);
    let bytes = Data::new(data, ctxt);
    if let Ok((dict, _)) = bytes.deserialize::<HashMap<String, OwnedVariant>>() {
        let _ = outlive::publish::dbus::queue1::decode_enqueue(&dict);
    }
});
