//! The audit record, its typed details and its canonical byte form.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::error::AuditError;
use super::text::{bounded, MAX_DETAIL_LEN, MAX_FINGERPRINT_LEN, MAX_SUBJECT_LEN};

/// The `prev` value of the first record (seq 1): 64 ASCII zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The `actor.subject` used for events the service performs on its own behalf.
pub const SERVICE_SUBJECT: &str = "service";

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex_lower(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub(super) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}

/// True if `s` is exactly 64 lowercase hex digits (the form of every hash in a record).
pub(super) fn is_hash_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Who caused an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// Certificate subject CN of the client, or `"service"` for the service itself.
    pub subject: String,
    /// Lowercase hex SHA-256 of the client's DER certificate, or empty.
    pub fingerprint: String,
}

impl Actor {
    /// The service acting on its own behalf (start/stop, checkpoints, timers).
    pub fn service() -> Self {
        Actor {
            subject: SERVICE_SUBJECT.to_owned(),
            fingerprint: String::new(),
        }
    }

    /// A client identified by its certificate: `subject` is the CN (bounded, see
    /// [`crate::text`]), the fingerprint is computed here as the SHA-256 of `cert_der`.
    pub fn from_certificate(subject: &str, cert_der: &[u8]) -> Self {
        Actor {
            subject: bounded(subject, MAX_SUBJECT_LEN),
            fingerprint: sha256_hex(cert_der),
        }
    }

    /// A client whose fingerprint (lowercase hex SHA-256 of its certificate) is already
    /// known. Both strings are bounded (see [`crate::text`]).
    pub fn new(subject: &str, fingerprint_hex: &str) -> Self {
        Actor {
            subject: bounded(subject, MAX_SUBJECT_LEN),
            fingerprint: bounded(fingerprint_hex, MAX_FINGERPRINT_LEN),
        }
    }
}

/// One non-secret fact in a record's `details`: a string, an unsigned integer or a boolean.
///
/// There is deliberately no byte-string, float, null or nested variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetailValue {
    /// A short, non-secret string (an id, a name, a reason).
    Str(String),
    /// An unsigned integer (a count, a seq, a version).
    U64(u64),
    /// A flag.
    Bool(bool),
}

impl DetailValue {
    /// The string, if this is a [`DetailValue::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            DetailValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is a [`DetailValue::U64`].
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            DetailValue::U64(n) => Some(*n),
            _ => None,
        }
    }

    /// The flag, if this is a [`DetailValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            DetailValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl Serialize for DetailValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DetailValue::Str(v) => s.serialize_str(v),
            DetailValue::U64(v) => s.serialize_u64(*v),
            DetailValue::Bool(v) => s.serialize_bool(*v),
        }
    }
}

impl<'de> Deserialize<'de> for DetailValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DetailValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, an unsigned integer or a boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DetailValue, E> {
                Ok(DetailValue::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<DetailValue, E> {
                Ok(DetailValue::Str(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DetailValue, E> {
                Ok(DetailValue::U64(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<DetailValue, E> {
                Ok(DetailValue::Bool(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// The optional `details` object of a record: a flat map of non-secret facts.
///
/// **Never put a secret in a record** — no PIN, PUK, password, OTP code or seed, key
/// material, session token, or anything derived from one (not even a hash of a PIN:
/// low-entropy secrets are brute-forced from their hashes). Audit logs are exported,
/// copied and read by people who must not learn secrets.
///
/// The builder makes that hard to do by accident: keys must be `&'static str`
/// (vocabulary chosen in code, never data), values are only `&str`, `u64` or `bool`
/// (no byte strings, so raw key material or buffers cannot be dropped in), and there is
/// no way to embed arbitrary JSON. Keys are kept sorted, so insertion order never
/// changes a record's hash; setting a key twice keeps the last value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Details(BTreeMap<String, DetailValue>);

impl Details {
    /// An empty set of details.
    pub fn new() -> Self {
        Details(BTreeMap::new())
    }

    /// Adds a non-secret string fact (an id, a name, a reason), bounded to
    /// [`MAX_DETAIL_LEN`] bytes (see [`crate::text`]).
    #[must_use]
    pub fn str(mut self, key: &'static str, value: &str) -> Self {
        self.0.insert(
            key.to_owned(),
            DetailValue::Str(bounded(value, MAX_DETAIL_LEN)),
        );
        self
    }

    /// Adds an unsigned integer fact (a count, a seq, a version).
    #[must_use]
    pub fn u64(mut self, key: &'static str, value: u64) -> Self {
        self.0.insert(key.to_owned(), DetailValue::U64(value));
        self
    }

    /// Adds a boolean fact.
    #[must_use]
    pub fn bool(mut self, key: &'static str, value: bool) -> Self {
        self.0.insert(key.to_owned(), DetailValue::Bool(value));
        self
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&DetailValue> {
        self.0.get(key)
    }

    /// All facts, in canonical (sorted key) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &DetailValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of facts.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are no facts.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Details {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Details;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a flat JSON object of string, unsigned integer or boolean values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Details, A::Error> {
                let mut map = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<String, DetailValue>()? {
                    // A duplicate key would let the raw line say something other than
                    // what was hashed; refuse it.
                    if map.contains_key(&k) {
                        return Err(de::Error::custom(format_args!(
                            "duplicate details key `{k}`"
                        )));
                    }
                    map.insert(k, v);
                }
                Ok(Details(map))
            }
        }
        d.deserialize_map(V)
    }
}

/// A head of the chain: the seq and hash of one record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Head {
    /// The record's seq.
    pub seq: u64,
    /// The record's `hash` (64 lowercase hex digits).
    pub hash: String,
}

impl Head {
    /// The seq and hash of `record`, as stored.
    pub fn of(record: &AuditRecord) -> Self {
        Head {
            seq: record.seq,
            hash: record.hash.clone(),
        }
    }
}

/// One entry of the audit trail, as stored and exported (one JSON object per line).
///
/// Field order here is the canonical order (see [`AuditRecord::canonical_bytes`]); serde
/// serialization emits the same order, with `hash` last and `details` omitted when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the chain: 1 for the first record, then +1 with no gaps.
    pub seq: u64,
    /// Unix time in milliseconds, as supplied by the caller.
    pub time: u64,
    /// Who caused the event.
    pub actor: Actor,
    /// What happened, e.g. `"credential.verify"`, `"ceremony.approve"`.
    pub action: String,
    /// The id of what it happened to.
    pub object: String,
    /// `"ok"`, `"denied"` or `"failed: <reason>"`.
    pub outcome: String,
    /// Non-secret facts; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
    /// `hash` of the previous record; [`GENESIS_PREV`] for seq 1.
    pub prev: String,
    /// Lowercase hex SHA-256 of [`AuditRecord::canonical_bytes`].
    pub hash: String,
}

impl AuditRecord {
    /// The canonical bytes that `hash` is computed over: every field except `hash`.
    ///
    /// Canonical form (version 1), a compact JSON object, byte for byte:
    ///
    /// ```text
    /// {"seq":N,"time":N,"actor":{"subject":S,"fingerprint":S},"action":S,"object":S,
    ///  "outcome":S[,"details":{K:V,...}],"prev":S}
    /// ```
    /// (one line, no whitespace anywhere outside strings)
    ///
    /// * keys in exactly that order; `details` is omitted when `None` and written as
    ///   `{}` when present but empty;
    /// * `details` keys sorted by their UTF-8 bytes, values a string, an unsigned decimal
    ///   integer or `true`/`false`;
    /// * integers in plain decimal, no sign, no leading zeros, no exponent;
    /// * strings in double quotes, escaping only `"` → `\"`, `\` → `\\`, U+0008 → `\b`,
    ///   U+000C → `\f`, U+000A → `\n`, U+000D → `\r`, U+0009 → `\t`, and the other
    ///   U+0000–U+001F as `\u00xx` (lowercase hex); every other character, including
    ///   `/`, U+007F and non-ASCII, is written as its raw UTF-8 bytes.
    ///
    /// This is exactly what `serde_json` emits for these types, but it is written by
    /// hand here so the form can never drift with a dependency's version or features.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(256);
        self.write_canonical_fields(&mut out);
        out.push('}');
        out.into_bytes()
    }

    /// Lowercase hex SHA-256 of [`AuditRecord::canonical_bytes`].
    pub fn compute_hash(&self) -> String {
        sha256_hex(&self.canonical_bytes())
    }

    /// True if the stored `hash` equals [`AuditRecord::compute_hash`].
    pub fn hash_matches(&self) -> bool {
        self.hash == self.compute_hash()
    }

    /// True if this is a checkpoint record (action [`super::CHECKPOINT_ACTION`]).
    pub fn is_checkpoint(&self) -> bool {
        self.action == super::CHECKPOINT_ACTION
    }

    /// The export/storage form: the canonical bytes with `,"hash":"…"` added before the
    /// closing brace, as one line without a trailing newline.
    pub fn to_json_line(&self) -> String {
        let mut out = String::with_capacity(256 + 80);
        self.write_canonical_fields(&mut out);
        out.push_str(",\"hash\":");
        push_json_str(&mut out, &self.hash);
        out.push('}');
        out
    }

    /// Sets `hash` from the canonical bytes and returns [`AuditRecord::to_json_line`],
    /// encoding the record once for both.
    pub(crate) fn seal_hash(&mut self) -> String {
        let mut out = String::with_capacity(256 + 80);
        self.write_canonical_fields(&mut out);
        out.push('}');
        self.hash = sha256_hex(out.as_bytes());
        // The canonical bytes end with the closing brace; the line puts the hash before it.
        out.pop();
        out.push_str(",\"hash\":");
        push_json_str(&mut out, &self.hash);
        out.push('}');
        out
    }

    /// Parses one line of the export/storage form. Any valid JSON with exactly the
    /// record's fields is accepted (unknown fields, duplicate keys and unsupported
    /// detail values are rejected); the hash is *not* checked here.
    pub fn from_json_line(line: &str) -> Result<Self, AuditError> {
        Ok(serde_json::from_str(line)?)
    }

    fn write_canonical_fields(&self, out: &mut String) {
        use std::fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(out, "{{\"seq\":{},\"time\":{}", self.seq, self.time);
        out.push_str(",\"actor\":{\"subject\":");
        push_json_str(out, &self.actor.subject);
        out.push_str(",\"fingerprint\":");
        push_json_str(out, &self.actor.fingerprint);
        out.push_str("},\"action\":");
        push_json_str(out, &self.action);
        out.push_str(",\"object\":");
        push_json_str(out, &self.object);
        out.push_str(",\"outcome\":");
        push_json_str(out, &self.outcome);
        if let Some(details) = &self.details {
            out.push_str(",\"details\":{");
            for (i, (k, v)) in details.0.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(out, k);
                out.push(':');
                match v {
                    DetailValue::Str(s) => push_json_str(out, s),
                    DetailValue::U64(n) => {
                        let _ = write!(out, "{n}");
                    }
                    DetailValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                }
            }
            out.push('}');
        }
        out.push_str(",\"prev\":");
        push_json_str(out, &self.prev);
    }
}

/// Appends `s` as a JSON string literal, escaped per the canonical rules.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let b = c as u8;
                out.push_str("\\u00");
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0x0f)] as char);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
