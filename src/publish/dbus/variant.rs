//! Conversion of the agent's JSON reports into D-Bus dictionaries (`a{sv}`), so that the CLI's
//! `--json` output and the D-Bus replies are built from one representation.

use std::collections::HashMap;

use zbus::wire::{OwnedVariant, Variant};

/// A JSON value as a variant: objects become `a{sv}`, arrays of strings `as`, arrays of objects
/// `aa{sv}`, other arrays `av`; integers `t` (unsigned) or `x`; `null` has no variant (the key is
/// left out of its dictionary).
pub fn to_variant(v: &serde_json::Value) -> Option<OwnedVariant> {
    use serde_json::Value as J;
    let owned = |v: Variant<'_>| OwnedVariant::try_from(v).ok();
    match v {
        J::Null => None,
        J::Bool(b) => Some(OwnedVariant::from(*b)),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Some(OwnedVariant::from(u))
            } else if let Some(i) = n.as_i64() {
                Some(OwnedVariant::from(i))
            } else {
                n.as_f64().map(OwnedVariant::from)
            }
        }
        J::String(s) => owned(Variant::from(s.clone())),
        J::Object(_) => Some(OwnedVariant::from(to_dict(v))),
        J::Array(items) => {
            if items.iter().all(|i| i.is_string()) {
                let strs: Vec<String> = items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect();
                owned(Variant::from(strs))
            } else if items.iter().all(|i| i.is_object()) {
                let dicts: Vec<HashMap<String, OwnedVariant>> = items.iter().map(to_dict).collect();
                owned(Variant::from(dicts))
            } else {
                let vars: Vec<OwnedVariant> = items.iter().filter_map(to_variant).collect();
                owned(Variant::from(vars))
            }
        }
    }
}

/// A JSON object as `a{sv}` (anything else gives an empty dictionary).
pub fn to_dict(v: &serde_json::Value) -> HashMap<String, OwnedVariant> {
    let mut out = HashMap::new();
    if let Some(o) = v.as_object() {
        for (k, val) in o {
            if let Some(var) = to_variant(val) {
                out.insert(k.clone(), var);
            }
        }
    }
    out
}

/// A variant as JSON (for `outlivectl --json`): dictionaries become objects, arrays arrays,
/// numbers numbers, strings strings.
/// About how many bytes `v` takes (strings by their length, every other scalar 8): the size
/// caps of X-1 for values whose type a caller chooses.
pub fn approx_bytes(v: &Variant<'_>) -> usize {
    match v {
        Variant::Str(s) => s.len(),
        Variant::Signature(s) => s.to_string().len(),
        Variant::ObjectPath(p) => p.as_str().len(),
        Variant::Variant(inner) => approx_bytes(inner),
        Variant::Array(a) => a.iter().map(approx_bytes).sum::<usize>() + 8,
        Variant::Dict(d) => {
            d.iter()
                .map(|(k, v)| approx_bytes(k) + approx_bytes(v))
                .sum::<usize>()
                + 8
        }
        Variant::Structure(s) => s.fields().iter().map(approx_bytes).sum::<usize>() + 8,
        _ => 8,
    }
}

pub fn to_json(v: &Variant<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Variant::U8(n) => J::from(*n),
        Variant::Bool(b) => J::Bool(*b),
        Variant::I16(n) => J::from(*n),
        Variant::U16(n) => J::from(*n),
        Variant::I32(n) => J::from(*n),
        Variant::U32(n) => J::from(*n),
        Variant::I64(n) => J::from(*n),
        Variant::U64(n) => J::from(*n),
        Variant::F64(n) => J::from(*n),
        Variant::Str(s) => J::String(s.as_str().to_string()),
        Variant::Signature(s) => J::String(s.to_string()),
        Variant::ObjectPath(p) => J::String(p.as_str().to_string()),
        Variant::Variant(inner) => to_json(inner),
        Variant::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Variant::Dict(d) => {
            let mut m = serde_json::Map::new();
            for (k, val) in d.iter() {
                let key = match k {
                    Variant::Str(s) => s.as_str().to_string(),
                    other => to_json(other).to_string(),
                };
                m.insert(key, to_json(val));
            }
            J::Object(m)
        }
        Variant::Structure(s) => J::Array(s.fields().iter().map(to_json).collect()),
        _ => J::Null,
    }
}

/// A dictionary of variants as a JSON object.
pub fn dict_to_json(d: &HashMap<String, OwnedVariant>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in d {
        m.insert(k.clone(), to_json(v));
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_become_dictionaries() {
        let v = serde_json::json!({"a": "x", "b": true, "c": 5, "d": null, "e": {"f": -1}, "g": ["p", "q"]});
        let d = to_dict(&v);
        assert_eq!(d.len(), 5, "null is left out");
        assert_eq!(String::try_from(d["a"].try_clone().unwrap()).unwrap(), "x");
        assert!(bool::try_from(d["b"].try_clone().unwrap()).unwrap());
        assert_eq!(u64::try_from(d["c"].try_clone().unwrap()).unwrap(), 5);
        let inner: HashMap<String, OwnedVariant> =
            HashMap::try_from(d["e"].try_clone().unwrap()).unwrap();
        assert_eq!(i64::try_from(inner["f"].try_clone().unwrap()).unwrap(), -1);
        let list: Vec<String> = Vec::try_from(d["g"].try_clone().unwrap()).unwrap();
        assert_eq!(list, vec!["p", "q"]);
        let mut back = dict_to_json(&d);
        back.as_object_mut()
            .unwrap()
            .insert("d".into(), serde_json::Value::Null);
        assert_eq!(back, v, "the round trip restores the report");
    }
}
