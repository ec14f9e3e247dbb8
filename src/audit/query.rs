//! Questions answered from parsed lines (seed 004's queries): counts grouped by keystore, key,
//! version, caller, operation and result over a time window, and the last successful and
//! last failed use of each key version by each caller.

use super::record::{Line, op};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// A dimension to group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    /// `keyVault`.
    Keystore,
    /// `key`.
    Key,
    /// `version`.
    Version,
    /// `caller` (uid, program, command).
    Caller,
    /// `operation`.
    Operation,
    /// `code`.
    Result,
}

impl std::str::FromStr for Dim {
    type Err = String;
    fn from_str(s: &str) -> Result<Dim, String> {
        Ok(match s {
            "keystore" | "vault" | "keyVault" => Dim::Keystore,
            "key" => Dim::Key,
            "version" => Dim::Version,
            "caller" => Dim::Caller,
            "operation" | "op" => Dim::Operation,
            "result" | "code" => Dim::Result,
            _ => {
                return Err(format!(
                    "unknown grouping {s:?}: use keystore, key, version, caller, operation, \
                     result"
                ));
            }
        })
    }
}

/// Every dimension, in column order.
pub const ALL_DIMS: [Dim; 6] = [
    Dim::Keystore,
    Dim::Key,
    Dim::Version,
    Dim::Caller,
    Dim::Operation,
    Dim::Result,
];

/// Which lines a query looks at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only lines at or after this `time` string (see `record::time_key`).
    pub since: Option<String>,
    /// Only lines before this `time` string.
    pub until: Option<String>,
    /// Only this key name.
    pub key: Option<String>,
}

impl Filter {
    /// Does `l` pass?
    pub fn admits(&self, l: &Line) -> bool {
        self.since.as_ref().is_none_or(|s| l.time >= *s)
            && self.until.as_ref().is_none_or(|u| l.time < *u)
            && self.key.as_ref().is_none_or(|k| l.key == *k)
    }
}

/// Drops the copies of an event read from several logs (same `eventId`).
#[derive(Debug, Default)]
pub struct Dedup(HashSet<String>);

impl Dedup {
    /// True the first time an event is seen (lines without an id always pass).
    pub fn first(&mut self, l: &Line) -> bool {
        l.event_id.is_empty() || self.0.insert(l.event_id.clone())
    }
}

/// One row of a summary: the grouped values (absent when not grouped by) and the count.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Row {
    /// `keyVault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keystore: Option<String>,
    /// `key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `version`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Caller label (`uid:program command`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// `operation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// `code`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Operations counted (a heartbeat line counts for the polls it stands for).
    pub count: u64,
}

impl Row {
    /// The value of one dimension.
    pub fn get(&self, d: Dim) -> &str {
        let v = match d {
            Dim::Keystore => &self.keystore,
            Dim::Key => &self.key,
            Dim::Version => &self.version,
            Dim::Caller => &self.caller,
            Dim::Operation => &self.operation,
            Dim::Result => &self.result,
        };
        v.as_deref().unwrap_or("")
    }
}

/// Counts lines grouped by some dimensions.
#[derive(Debug)]
pub struct Summary {
    by: Vec<Dim>,
    groups: BTreeMap<Row, u64>,
}

impl Summary {
    /// An empty summary grouping by `by` (every dimension if empty).
    pub fn new(by: &[Dim]) -> Summary {
        let mut by = if by.is_empty() {
            ALL_DIMS.to_vec()
        } else {
            by.to_vec()
        };
        by.sort();
        by.dedup();
        Summary {
            by,
            groups: BTreeMap::new(),
        }
    }

    /// The dimensions grouped by, in column order.
    pub fn dims(&self) -> &[Dim] {
        &self.by
    }

    /// Count `l`.
    pub fn add(&mut self, l: &Line) {
        let has = |d| self.by.contains(&d);
        let key = Row {
            keystore: has(Dim::Keystore).then(|| l.key_vault.clone()),
            key: has(Dim::Key).then(|| l.key.clone()),
            version: has(Dim::Version).then(|| l.version.clone()),
            caller: has(Dim::Caller).then(|| l.caller.label()),
            operation: has(Dim::Operation).then(|| l.operation.clone()),
            result: has(Dim::Result).then(|| l.code.clone()),
            count: 0,
        };
        let n = self.groups.entry(key).or_insert(0);
        *n = n.saturating_add(l.count.max(1));
    }

    /// The rows, largest count first.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .groups
            .iter()
            .map(|(k, n)| Row {
                count: *n,
                ..k.clone()
            })
            .collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.cmp(b)));
        rows
    }
}

/// One use of a key, as `last-use` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Use {
    /// When (RFC 3339).
    pub time: String,
    /// Which operation.
    pub operation: String,
    /// Its code.
    pub code: String,
    /// Its message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The volume, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub resource: String,
    /// The process.
    pub pid: u32,
}

/// Last successful and last failed use of one key version by one caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastUse {
    /// `keyVault`.
    pub keystore: String,
    /// `key`.
    pub key: String,
    /// `version`.
    pub version: String,
    /// Caller label.
    pub caller: String,
    /// Last success.
    pub last_success: Option<Use>,
    /// Last failure.
    pub last_failure: Option<Use>,
}

/// keystore, key, version, caller.
type UseKey = (String, String, String, String);
/// Last success, last failure.
type UsePair = (Option<Use>, Option<Use>);

/// Collects the last uses (wrap, unwrap, poll) per key version per caller.
#[derive(Debug, Default)]
pub struct LastUses {
    map: BTreeMap<UseKey, UsePair>,
}

impl LastUses {
    /// Look at `l` (lines that are not key uses are ignored).
    pub fn add(&mut self, l: &Line) {
        if !op::KEY_USES.contains(&l.operation.as_str()) {
            return;
        }
        let u = Use {
            time: l.time.clone(),
            operation: l.operation.clone(),
            code: l.code.clone(),
            message: l.message.clone(),
            resource: l.resource_id.clone(),
            pid: l.caller.pid,
        };
        let e = self
            .map
            .entry((
                l.key_vault.clone(),
                l.key.clone(),
                l.version.clone(),
                l.caller.label(),
            ))
            .or_default();
        let slot = if l.ok() { &mut e.0 } else { &mut e.1 };
        if slot.as_ref().is_none_or(|old| u.time >= old.time) {
            *slot = Some(u);
        }
    }

    /// The result, by keystore, key, version (numerically) and caller.
    pub fn rows(&self) -> Vec<LastUse> {
        let mut rows: Vec<LastUse> = self
            .map
            .iter()
            .map(|((ks, k, v, c), (ok, fail))| LastUse {
                keystore: ks.clone(),
                key: k.clone(),
                version: v.clone(),
                caller: c.clone(),
                last_success: ok.clone(),
                last_failure: fail.clone(),
            })
            .collect();
        rows.sort_by(|a, b| {
            (&a.keystore, &a.key)
                .cmp(&(&b.keystore, &b.key))
                .then_with(|| {
                    let n = |v: &str| v.parse::<u64>().unwrap_or(u64::MAX);
                    n(&a.version).cmp(&n(&b.version))
                })
                .then_with(|| a.version.cmp(&b.version))
                .then_with(|| a.caller.cmp(&b.caller))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Caller;

    fn l(time: &str, key: &str, v: &str, op: &str, code: &str, uid: u32) -> Line {
        Line {
            time: time.into(),
            seq: 1,
            task_name: "T".into(),
            activity_id: "a".into(),
            event_id: format!("{time}{op}{code}{uid}"),
            category: "info".into(),
            resource_id: String::new(),
            key_vault: "soft:/ks".into(),
            key: key.into(),
            version: v.into(),
            operation: op.into(),
            code: code.into(),
            message: String::new(),
            caller: Caller {
                uid,
                pid: 7,
                program: "kekfs".into(),
                command: "mount".into(),
            },
            duration_ms: 0.0,
            count: 1,
            prev: String::new(),
        }
    }

    #[test]
    fn summary_groups_and_filters() {
        let lines = [
            l("2027-01-01T00:00:00.000Z", "k", "1", "unwrapKey", "200", 0),
            l("2027-01-01T00:00:01.000Z", "k", "1", "unwrapKey", "200", 0),
            l("2027-01-01T00:00:02.000Z", "k", "1", "unwrapKey", "403", 0),
            l("2027-01-02T00:00:00.000Z", "k", "2", "wrapKey", "200", 1000),
        ];
        let mut s = Summary::new(&[Dim::Version, Dim::Result]);
        let f = Filter {
            until: Some("2027-01-02T00:00:00.000Z".into()),
            ..Filter::default()
        };
        for x in lines.iter().filter(|x| f.admits(x)) {
            s.add(x);
        }
        let rows = s.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].get(Dim::Version), rows[0].count), ("1", 2));
        assert_eq!(rows[0].get(Dim::Result), "200");
        assert_eq!(rows[1].get(Dim::Result), "403");
        assert_eq!(rows[0].keystore, None);
        let mut all = Summary::new(&[]);
        let mut heartbeat = lines[0].clone();
        heartbeat.count = 40;
        all.add(&heartbeat);
        assert_eq!(all.rows()[0].count, 40);
        assert_eq!(all.dims().len(), 6);
        assert!("nope".parse::<Dim>().is_err());
    }

    #[test]
    fn last_use_per_caller_and_version() {
        let mut lu = LastUses::default();
        for x in [
            l("2027-01-01T00:00:00.000Z", "k", "1", "unwrapKey", "200", 0),
            l("2027-01-03T00:00:00.000Z", "k", "1", "poll", "200", 0),
            l("2027-01-02T00:00:00.000Z", "k", "1", "unwrapKey", "403", 0),
            l("2027-01-04T00:00:00.000Z", "k", "10", "unwrapKey", "200", 0),
            l(
                "2027-01-04T00:00:00.000Z",
                "k",
                "2",
                "unwrapKey",
                "404",
                1000,
            ),
            l("2027-01-05T00:00:00.000Z", "k", "2", "disable", "200", 0),
        ] {
            lu.add(&x);
        }
        let rows = lu.rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].version, "1");
        assert_eq!(
            rows[0].last_success.as_ref().unwrap().time,
            "2027-01-03T00:00:00.000Z"
        );
        assert_eq!(rows[0].last_failure.as_ref().unwrap().code, "403");
        assert_eq!(rows[1].version, "2");
        assert!(rows[1].last_success.is_none());
        assert_eq!(rows[1].caller, "1000:kekfs mount");
        assert_eq!(rows[2].version, "10");
    }

    #[test]
    fn dedup_by_event() {
        let mut d = Dedup::default();
        let x = l("t", "k", "1", "unwrapKey", "200", 0);
        assert!(d.first(&x));
        assert!(!d.first(&x));
    }
}
