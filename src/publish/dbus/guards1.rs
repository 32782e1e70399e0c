//! `/org/outlive/Agent1/Guards`, interface `org.outlive.Guards1` (SPEC X-1, §6): the guard
//! posture. Properties `Summary`, `Anomalies` and `Attention` (with PropertiesChanged);
//! `GetGuards` (the G-10 rows, for everyone), `ReportGuard` (G-2: root or the owner of the
//! declaring drop-in), `AckAttention` (root or `outlive`); signals `PostureChanged` and
//! `AttentionRaised`.
//!
//! The object reads the last published evaluation and never waits for one in progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::wire::OwnedVariant;
use zbus::{Connection, interface};

use super::Publisher;
use super::errors::OutliveError;
use super::gate::{Gate, Kind, MAX_REPORT_OPTIONS_BYTES, blocking};
use super::variant::to_dict;
use crate::audit::AuditSink;
use crate::posture::attention::Attention;
use crate::posture::rows::Row;
use crate::posture::{GuardReport, Published, ReportBook, ReportError};
use crate::sync::{MutexExt, RwLockExt};

/// The interface object.
#[derive(Clone)]
pub struct Guards1 {
    pub published: Arc<RwLock<Published>>,
    pub rows: SharedRows,
    pub book: Arc<ReportBook>,
    pub attention: Arc<Mutex<Attention>>,
    pub audit: Arc<dyn AuditSink>,
    /// Asks for an evaluation (a runtime change, G-8).
    pub poke: Arc<tokio::sync::Notify>,
    pub gate: Arc<Gate>,
    pub publisher: Arc<Publisher>,
}

/// The changeable properties, for change detection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GuardsProps {
    pub summary: Vec<(String, u32)>,
    pub anomalies: Vec<String>,
    pub attention: serde_json::Value,
}

impl GuardsProps {
    pub fn of(p: &Published) -> GuardsProps {
        GuardsProps {
            summary: p.summary.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            anomalies: p.anomalies.clone(),
            attention: p.attention.clone(),
        }
    }
}

impl From<ReportError> for OutliveError {
    fn from(e: ReportError) -> OutliveError {
        match e {
            ReportError::NotFound(m) => OutliveError::NotFound(m),
            ReportError::AccessDenied(m) => OutliveError::AccessDenied(m),
            ReportError::Invalid(m) => OutliveError::InvalidArgument(m),
        }
    }
}

impl Guards1 {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Published> {
        self.published.reading()
    }
}

/// One G-10 row on the wire: an `a{sv}` with exactly the projection's fields (absent ones
/// omitted), serialised straight from the struct, with no intermediate map.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    zbus::wire::SerializeDict,
    zbus::wire::DeserializeDict,
    zbus::wire::Type,
)]
#[zbus(signature = "a{sv}", crate = "zbus::wire")]
pub struct RowWire {
    pub key: String,
    pub description: String,
    pub effective: String,
    pub off_class: Option<String>,
    pub config_enabled: bool,
    pub default_enabled: bool,
    pub runtime_enabled: Option<bool>,
    pub dry_run: bool,
    pub stale: bool,
    pub last_tick_at: Option<u64>,
    pub reason_code: Option<String>,
    pub diverged: bool,
    pub load_bearing: bool,
    pub since: u64,
    pub source: String,
}

impl From<&Row> for RowWire {
    fn from(r: &Row) -> RowWire {
        RowWire {
            key: r.key.clone(),
            description: r.description.clone(),
            effective: r.effective.to_string(),
            off_class: r.off_class.map(str::to_string),
            config_enabled: r.config_enabled,
            default_enabled: r.default_enabled,
            runtime_enabled: r.runtime_enabled,
            dry_run: r.dry_run,
            stale: r.stale,
            last_tick_at: r.last_tick_at,
            reason_code: r.reason_code.clone(),
            diverged: r.diverged,
            load_bearing: r.load_bearing,
            since: r.since,
            source: r.source.clone(),
        }
    }
}

/// Rows as `aa{sv}`.
pub fn rows_wire(rows: &[Row]) -> Vec<RowWire> {
    rows.iter().map(RowWire::from).collect()
}

/// The rows as last published, converted once per evaluation and shared by every
/// `GetGuards` reply (no copy per call).
pub type SharedRows = Arc<RwLock<Arc<Vec<RowWire>>>>;

/// A `GetGuards` reply: serialises the shared rows in place.
pub struct RowsReply(Arc<Vec<RowWire>>);

impl serde::Serialize for RowsReply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl zbus::wire::Type for RowsReply {
    const SIGNATURE: &'static zbus::wire::Signature = <Vec<RowWire> as zbus::wire::Type>::SIGNATURE;
}

#[interface(name = "org.outlive.Guards1")]
impl Guards1 {
    /// Rows per effective state (all ten states).
    #[zbus(property)]
    fn summary(&self) -> HashMap<String, u32> {
        self.read()
            .summary
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The current anomalies, `key: kind (reason)`.
    #[zbus(property)]
    fn anomalies(&self) -> Vec<String> {
        self.read().anomalies.clone()
    }

    /// The attention item (G-9), computed for the caller (§12 G-10): in full for root and
    /// members; kinds, entry ids and counts for everyone else. Its change signal carries no
    /// value (`invalidates`), so nobody receives another caller's view.
    #[zbus(property(emits_changed_signal = "invalidates"))]
    async fn attention(
        &self,
        #[zbus(header)] hdr: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<HashMap<String, OwnedVariant>> {
        let full = match &hdr {
            Some(h) => {
                let pass = self
                    .gate
                    .enter(conn, h, Kind::Read)
                    .await
                    .map_err(|e| match e {
                        OutliveError::Busy(m) => zbus::fdo::Error::LimitsExceeded(m),
                        OutliveError::AccessDenied(m) => zbus::fdo::Error::AccessDenied(m),
                        other => zbus::fdo::Error::Failed(other.to_string()),
                    })?;
                pass.caller.may_mutate(&self.gate.policy())
            }
            // Not a caller's Get: the public view.
            None => false,
        };
        let p = self.read();
        Ok(to_dict(if full {
            &p.attention
        } else {
            &p.attention_public
        }))
    }

    /// Every row (G-10).
    #[zbus(out_args("rows"))]
    async fn get_guards(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<RowsReply, OutliveError> {
        let _pass = self.gate.enter(conn, &hdr, Kind::Read).await?;
        Ok(RowsReply(Arc::clone(&self.rows.reading())))
    }

    /// An external guard's runtime status (G-2, G-3). `options`: `verdict_unknown` (b),
    /// `reason_code` (s). Only an accepted report asks for an evaluation (§12 X-1).
    #[expect(
        clippy::too_many_arguments,
        reason = "the D-Bus method's arguments are the interface (docs/dbus), plus zbus's header and connection"
    )]
    async fn report_guard(
        &self,
        key: String,
        enabled: bool,
        dry_run: bool,
        tick_at_ms: u64,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        // Sizes first, before anything is done for the call (§12 X-1 bounds).
        if key.len() > 64 {
            return Err(OutliveError::InvalidArgument(
                "key: at most 64 bytes".into(),
            ));
        }
        let size: usize = options
            .iter()
            .map(|(k, v)| k.len() + super::variant::approx_bytes(v))
            .sum();
        if options.len() > 8 || size > MAX_REPORT_OPTIONS_BYTES {
            return Err(OutliveError::InvalidArgument(format!(
                "options: at most 8 entries and {MAX_REPORT_OPTIONS_BYTES} bytes (verdict_unknown, reason_code)"
            )));
        }
        let caller = self.gate.enter(conn, &hdr, Kind::Read).await?.caller;
        let mut r = GuardReport {
            enabled,
            dry_run,
            tick_at_ms,
            ..GuardReport::default()
        };
        for (k, v) in &options {
            let bad =
                |want: &str| OutliveError::InvalidArgument(format!("options.{k}: expected {want}"));
            match k.as_str() {
                "verdict_unknown" => match bool::try_from(v.try_clone().map_err(|_| bad("b"))?) {
                    Ok(b) => r.verdict_unknown = Some(b),
                    Err(_) => {
                        self.malformed(caller.uid, &key);
                        return Err(bad("b (boolean)"));
                    }
                },
                "reason_code" => match String::try_from(v.try_clone().map_err(|_| bad("s"))?) {
                    Ok(s) if s.len() <= 64 => r.reason_code = Some(s),
                    _ => {
                        self.malformed(caller.uid, &key);
                        return Err(bad("s (a reason code)"));
                    }
                },
                _ => {
                    return Err(OutliveError::InvalidArgument(format!(
                        "options.{k}: unknown option (verdict_unknown, reason_code)"
                    )));
                }
            }
        }
        self.book.report(caller.uid, &key, r)?;
        self.poke.notify_one();
        Ok(())
    }

    /// One-off notices leave the attention item now (G-9).
    async fn ack_attention(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), OutliveError> {
        let pass = self.gate.enter(conn, &hdr, Kind::Mutate).await?;
        if !pass.caller.may_mutate(&self.gate.policy()) {
            return Err(OutliveError::AccessDenied(
                "AckAttention needs root or membership in the outlive group".into(),
            ));
        }
        // The restored entry, if the item closes, is audited: on the blocking pool.
        let (attention, audit) = (Arc::clone(&self.attention), Arc::clone(&self.audit));
        blocking(move || {
            let (_, events) = attention.locked().ack();
            for e in &events {
                audit.record(e);
            }
        })
        .await?;
        self.poke.notify_one();
        Ok(())
    }

    /// Rows whose state changed.
    #[zbus(signal)]
    pub async fn posture_changed(
        emitter: &SignalEmitter<'_>,
        changed_rows: Vec<RowWire>,
    ) -> zbus::Result<()>;

    /// The attention item opened or grew.
    #[zbus(signal)]
    pub async fn attention_raised(
        emitter: &SignalEmitter<'_>,
        kind: &str,
        detail: &str,
    ) -> zbus::Result<()>;
}

impl Guards1 {
    /// Only the declaring file's owner (or root) makes a malformed report count.
    fn malformed(&self, uid: u32, key: &str) {
        if uid == 0
            || self
                .book
                .dropins()
                .find(key)
                .is_some_and(|d| d.owner == uid)
        {
            self.book.malformed(key);
            self.poke.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::posture::rows::ROW_FIELDS;

    #[test]
    fn g10_the_wire_row_carries_the_projection_and_nothing_else() {
        let row = Row {
            key: "queue.resume".into(),
            description: "d".into(),
            effective: "off-runtime-divergent",
            off_class: Some("dark-default"),
            config_enabled: true,
            default_enabled: true,
            runtime_enabled: Some(false),
            dry_run: false,
            stale: false,
            last_tick_at: Some(5),
            reason_code: Some("foreign-host".into()),
            diverged: false,
            load_bearing: true,
            since: 7,
            source: "builtin".into(),
        };
        let ctxt = zbus::wire::serialized::Context::new(zbus::wire::Endian::Little, 0);
        let bytes = zbus::wire::to_bytes(ctxt, &vec![RowWire::from(&row)]).unwrap();
        let (maps, _): (Vec<HashMap<String, OwnedVariant>>, _) = bytes.deserialize().unwrap();
        let mut keys: Vec<&str> = maps[0].keys().map(String::as_str).collect();
        keys.sort();
        let mut want: Vec<&str> = ROW_FIELDS.to_vec();
        want.sort();
        assert_eq!(keys, want);
        // The same through the JSON projection (what --json prints).
        let json = crate::publish::dbus::variant::dict_to_json(&maps[0]);
        assert_eq!(json, row.to_json());
        // Absent optional fields are omitted, as in the projection.
        let mut bare = row.clone();
        bare.off_class = None;
        bare.reason_code = None;
        bare.runtime_enabled = None;
        bare.last_tick_at = None;
        let bytes = zbus::wire::to_bytes(ctxt, &vec![RowWire::from(&bare)]).unwrap();
        let (maps, _): (Vec<HashMap<String, OwnedVariant>>, _) = bytes.deserialize().unwrap();
        assert_eq!(maps[0].len(), ROW_FIELDS.len() - 4);
    }
}
