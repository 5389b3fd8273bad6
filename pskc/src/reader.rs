//! The streaming reader: the header first, then one `KeyPackage` at a time.

use std::collections::HashSet;
use std::io::BufRead;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{EntryError, EntryErrorKind, Error};
use crate::types::*;
use crate::xml::{Ev, Node, Ns, Xml};

/// Parser limits. The defaults suit vendor files of millions of entries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Maximum element nesting depth (RFC 6030 documents need about 8).
    pub max_depth: usize,
    /// Maximum bytes of one XML event (a tag with its attributes, a text run, a
    /// comment): bounds what the XML layer buffers.
    pub max_event_bytes: usize,
    /// Maximum character data in one element.
    pub max_text_bytes: usize,
    /// Maximum attributes on one element.
    pub max_attributes: usize,
    /// Maximum elements in one KeyPackage (or one header element).
    pub max_package_nodes: usize,
    /// Maximum number of KeyPackages (`None`: unlimited).
    pub max_entries: Option<u64>,
    /// Maximum document size in bytes (`None`: unlimited).
    pub max_document_bytes: Option<u64>,
    /// Maximum names kept in an `ignored` list (further ones are counted only).
    pub max_recorded_unknown: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_event_bytes: 256 * 1024,
            max_text_bytes: 64 * 1024,
            max_attributes: 32,
            max_package_nodes: 512,
            max_entries: None,
            max_document_bytes: None,
            max_recorded_unknown: 64,
        }
    }
}

/// Reader options.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The limits.
    pub limits: Limits,
    /// Refuse the file on a second `Key/@Id` (default true). Keeps a 16-byte
    /// digest per id: about 100 MB for 5 million entries.
    pub check_duplicate_ids: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            check_duplicate_ids: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Packages,
    Done,
}

/// The streaming PSKC reader.
///
/// [`Reader::new`] reads the container header (everything before the first
/// `KeyPackage`); [`Reader::next_entry`] (or the iterator) then yields the
/// packages one at a time. Only one package's element tree is in memory at a time.
///
/// Element rule: elements of the PSKC, xmlenc, xmlenc 1.1, xmldsig and PKCS #5
/// namespaces that RFC 6030 does not define at their position are refused (the
/// entry, or the file when in the header); `pskc:Extensions` and elements of any
/// other namespace are skipped and their names recorded in `ignored`.
/// Unknown attributes are ignored.
pub struct Reader<R: BufRead> {
    xml: Xml<R>,
    header: Header,
    trailer: Trailer,
    phase: Phase,
    pending: Option<Node>,
    index: u64,
    ids: Option<HashSet<[u8; 16]>>,
    failed: bool,
}

impl<R: BufRead> std::fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("header", &self.header)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> Reader<R> {
    /// Reads the header with the default [`Options`].
    pub fn new(input: R) -> Result<Self, Error> {
        Self::with_options(input, Options::default())
    }

    /// Reads the header.
    pub fn with_options(input: R, options: Options) -> Result<Self, Error> {
        let mut xml = Xml::new(input, options.limits.clone());
        let root = loop {
            match xml.next()? {
                Ev::Start(n) => break n,
                Ev::Text(t) if t.trim().is_empty() => {}
                Ev::Text(_) => return Err(Error::Structure("text before the root element".into())),
                Ev::End => return Err(Error::Structure("unexpected end tag".into())),
                Ev::Eof => return Err(Error::Structure("empty document".into())),
            }
        };
        if !root.is(Ns::Pskc, "KeyContainer") {
            return Err(Error::Structure(format!(
                "root element is {}, not pskc:KeyContainer",
                root.qname()
            )));
        }
        let version = root.attr("Version").unwrap_or("").to_owned();
        if version != "1.0" {
            return Err(Error::Structure(format!(
                "KeyContainer Version {version:?} (RFC 6030 defines \"1.0\")"
            )));
        }
        let header = Header {
            version,
            id: root.attr("Id").or(root.attr("id")).map(str::to_owned),
            ..Header::default()
        };
        let mut r = Reader {
            xml,
            header,
            trailer: Trailer::default(),
            phase: Phase::Header,
            pending: None,
            index: 0,
            ids: options.check_duplicate_ids.then(HashSet::new),
            failed: false,
        };
        r.read_header()?;
        Ok(r)
    }

    /// The container header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// What followed the last package (complete once [`Self::next_entry`] returned `None`).
    pub fn trailer(&self) -> &Trailer {
        &self.trailer
    }

    /// Number of packages read so far.
    pub fn entries_read(&self) -> u64 {
        self.index
    }

    fn record(list: &mut Vec<String>, max: usize, node: &Node) {
        if list.len() < max {
            list.push(node.qname());
        }
    }

    /// The next top-level child of KeyContainer, as a tree; `None` at its end.
    fn next_child(&mut self) -> Result<Option<Node>, Error> {
        loop {
            match self.xml.next()? {
                Ev::Start(n) => {
                    let mut budget = self.xml.limits.max_package_nodes;
                    return Ok(Some(self.xml.subtree(n, &mut budget)?));
                }
                Ev::Text(t) if t.trim().is_empty() => {}
                Ev::Text(_) => {
                    return Err(Error::Structure("text directly inside KeyContainer".into()))
                }
                Ev::End => {
                    // End of KeyContainer: only whitespace, comments, PIs may follow.
                    loop {
                        match self.xml.next()? {
                            Ev::Eof => return Ok(None),
                            Ev::Text(t) if t.trim().is_empty() => {}
                            _ => {
                                return Err(Error::Structure(
                                    "content after the KeyContainer element".into(),
                                ))
                            }
                        }
                    }
                }
                Ev::Eof => {
                    return Err(Error::Xml {
                        position: self.xml.position(),
                        detail: "unexpected end of file (truncated document)".into(),
                    })
                }
            }
        }
    }

    fn read_header(&mut self) -> Result<(), Error> {
        let max = self.xml.limits.max_recorded_unknown;
        while self.phase == Phase::Header {
            let Some(node) = self.next_child()? else {
                self.phase = Phase::Done;
                break;
            };
            if node.is(Ns::Pskc, "KeyPackage") {
                self.pending = Some(node);
                self.phase = Phase::Packages;
            } else if node.is(Ns::Pskc, "EncryptionKey") {
                if self.header.encryption_key.is_some() {
                    return Err(Error::Header("two EncryptionKey elements".into()));
                }
                self.header.encryption_key = Some(parse_encryption_key(&node)?);
            } else if node.is(Ns::Pskc, "MACMethod") {
                if self.header.mac_method.is_some() {
                    return Err(Error::Header("two MACMethod elements".into()));
                }
                self.header.mac_method = Some(parse_mac_method(&node)?);
            } else if node.is(Ns::Pskc, "Signature") || node.is(Ns::Ds, "Signature") {
                self.trailer.signature = true;
                self.phase = Phase::Packages;
            } else if node.is_ignorable() {
                Self::record(&mut self.header.ignored, max, &node);
            } else {
                return Err(Error::Structure(format!(
                    "unknown element {} in KeyContainer",
                    node.qname()
                )));
            }
        }
        Ok(())
    }

    /// The next package: `Ok(None)` at the end of the file, `Ok(Some(Err(_)))` for a
    /// package that is refused on its own, `Err(_)` when the whole file is refused
    /// (after which the reader yields nothing more).
    pub fn next_entry(&mut self) -> Result<Option<Result<KeyPackage, EntryError>>, Error> {
        if self.failed {
            return Ok(None);
        }
        let r = self.next_entry_inner();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn next_entry_inner(&mut self) -> Result<Option<Result<KeyPackage, EntryError>>, Error> {
        let max = self.xml.limits.max_recorded_unknown;
        let node = loop {
            if let Some(n) = self.pending.take() {
                break n;
            }
            if self.phase == Phase::Done {
                return Ok(None);
            }
            let Some(node) = self.next_child()? else {
                self.phase = Phase::Done;
                return Ok(None);
            };
            if node.is(Ns::Pskc, "KeyPackage") {
                if self.trailer.signature {
                    return Err(Error::Structure("KeyPackage after Signature".into()));
                }
                break node;
            } else if node.is(Ns::Pskc, "Signature") || node.is(Ns::Ds, "Signature") {
                if self.trailer.signature {
                    return Err(Error::Structure("two Signature elements".into()));
                }
                self.trailer.signature = true;
            } else if node.is_ignorable() {
                Self::record(&mut self.trailer.ignored, max, &node);
            } else if node.is(Ns::Pskc, "EncryptionKey") || node.is(Ns::Pskc, "MACMethod") {
                return Err(Error::Structure(format!(
                    "{} after the first KeyPackage",
                    node.qname()
                )));
            } else {
                return Err(Error::Structure(format!(
                    "unknown element {} in KeyContainer",
                    node.qname()
                )));
            }
        };
        let index = self.index;
        self.index += 1;
        if let Some(max) = self.xml.limits.max_entries {
            if self.index > max {
                return Err(Error::Limit {
                    what: "KeyPackages in the file",
                    limit: max,
                });
            }
        }
        let parsed = parse_package(&node, index, max);
        let key_id = match &parsed {
            Ok(p) => Some(p.key.id.clone()),
            Err(e) => e.key_id.clone(),
        };
        if let (Some(ids), Some(id)) = (self.ids.as_mut(), key_id) {
            let d = Sha256::digest(id.as_bytes());
            let mut k = [0u8; 16];
            k.copy_from_slice(&d[..16]);
            if !ids.insert(k) {
                return Err(Error::DuplicateKeyId { id, index });
            }
        }
        Ok(Some(parsed))
    }
}

impl<R: BufRead> Iterator for Reader<R> {
    type Item = Result<Result<KeyPackage, EntryError>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_entry().transpose()
    }
}

// ---------------------------------------------------------------------------
// Interpretation of the trees.

type E = EntryErrorKind;

fn invalid(element: &str, detail: impl Into<String>) -> E {
    E::InvalidValue {
        element: element.to_owned(),
        detail: detail.into(),
    }
}

/// Base64 with any whitespace inside (PSKC files wrap long values).
pub(crate) fn b64(text: &str) -> Result<Vec<u8>, String> {
    let compact: Zeroizing<Vec<u8>> = Zeroizing::new(
        text.bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect::<Vec<u8>>(),
    );
    base64::engine::general_purpose::STANDARD
        .decode(&compact[..])
        .map_err(|_| "not valid base64".to_string())
}

fn int<T: std::str::FromStr>(node: &Node, what: &str) -> Result<T, E> {
    node.text()
        .parse::<T>()
        .map_err(|_| invalid(what, "not an integer in range"))
}

fn attr_int<T: std::str::FromStr>(node: &Node, name: &str) -> Result<Option<T>, E> {
    node.attr(name)
        .map(|v| {
            v.trim()
                .parse::<T>()
                .map_err(|_| invalid(&format!("{}/@{name}", node.name), "not an integer in range"))
        })
        .transpose()
}

fn set_once<T>(slot: &mut Option<T>, v: T, node: &Node) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::DuplicateElement(node.qname()));
    }
    *slot = Some(v);
    Ok(())
}

fn date(node: &Node) -> Result<DateTime, E> {
    let text = node.text().to_owned();
    let unix = crate::time::parse_datetime(&text)
        .ok_or_else(|| invalid(&node.name, "not an xs:dateTime"))?;
    Ok(DateTime { text, unix })
}

/// Unknown child rule for the entry parsers.
fn unknown(child: &Node, ignored: &mut Vec<String>, max: usize) -> Result<(), E> {
    if child.is_ignorable() {
        if ignored.len() < max {
            ignored.push(child.qname());
        }
        Ok(())
    } else {
        Err(E::UnknownElement(child.qname()))
    }
}

fn parse_package(node: &Node, index: u64, max: usize) -> Result<KeyPackage, EntryError> {
    let mut device_info = DeviceInfo::default();
    let mut cmi = None;
    let mut key_node = None;
    let mut ignored = Vec::new();
    // DeviceInfo and the Key's Id first, so an error can name them.
    let mut first_err: Option<E> = None;
    for c in &node.children {
        let r = if c.is(Ns::Pskc, "DeviceInfo") {
            parse_device_info(c, &mut device_info, &mut ignored, max)
        } else if c.is(Ns::Pskc, "CryptoModuleInfo") {
            let mut m = CryptoModuleInfo::default();
            let mut r = Ok(());
            for cc in &c.children {
                if cc.is(Ns::Pskc, "Id") {
                    r = r.and(set_once(&mut m.id, cc.text().to_owned(), cc));
                } else {
                    r = r.and(unknown(cc, &mut ignored, max));
                }
            }
            r.and(set_once(&mut cmi, m, c))
        } else if c.is(Ns::Pskc, "Key") {
            set_once(&mut key_node, c, c)
        } else {
            unknown(c, &mut ignored, max)
        };
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    let key_id = key_node.and_then(|k| k.attr("Id")).map(str::to_owned);
    let fail = |kind: E| EntryError {
        index,
        key_id: key_id.clone(),
        serial_no: device_info.serial_no.clone(),
        kind,
    };
    if let Some(e) = first_err {
        return Err(fail(e));
    }
    let Some(k) = key_node else {
        return Err(fail(E::NoKey));
    };
    let key = parse_key(k, &mut ignored, max).map_err(fail)?;
    Ok(KeyPackage {
        index,
        device_info,
        crypto_module_info: cmi,
        key,
        ignored,
    })
}

fn parse_device_info(
    node: &Node,
    d: &mut DeviceInfo,
    ignored: &mut Vec<String>,
    max: usize,
) -> Result<(), E> {
    for c in &node.children {
        let t = || c.text().to_owned();
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "Manufacturer") => set_once(&mut d.manufacturer, t(), c)?,
            (Ns::Pskc, "SerialNo") => set_once(&mut d.serial_no, t(), c)?,
            (Ns::Pskc, "Model") => set_once(&mut d.model, t(), c)?,
            (Ns::Pskc, "IssueNo") => set_once(&mut d.issue_no, t(), c)?,
            (Ns::Pskc, "DeviceBinding") => set_once(&mut d.device_binding, t(), c)?,
            (Ns::Pskc, "StartDate") => set_once(&mut d.start_date, date(c)?, c)?,
            (Ns::Pskc, "ExpiryDate") => set_once(&mut d.expiry_date, date(c)?, c)?,
            (Ns::Pskc, "UserId") => set_once(&mut d.user_id, t(), c)?,
            _ => unknown(c, ignored, max)?,
        }
    }
    Ok(())
}

fn parse_key(node: &Node, ignored: &mut Vec<String>, max: usize) -> Result<Key, E> {
    let id = node.attr("Id").ok_or(E::MissingKeyId)?.trim().to_owned();
    if id.is_empty() {
        return Err(E::MissingKeyId);
    }
    let algorithm = Algorithm::from_uri(node.attr("Algorithm").ok_or(E::MissingAlgorithm)?.trim());
    let mut key = Key {
        id,
        algorithm,
        issuer: None,
        algorithm_parameters: AlgorithmParameters::default(),
        key_profile_id: None,
        key_reference: None,
        friendly_name: None,
        data: Data::default(),
        user_id: None,
        policy: Policy::default(),
    };
    let (mut seen_params, mut seen_data, mut seen_policy) = (false, false, false);
    for c in &node.children {
        let t = || c.text().to_owned();
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "Issuer") => set_once(&mut key.issuer, t(), c)?,
            (Ns::Pskc, "KeyProfileId") => set_once(&mut key.key_profile_id, t(), c)?,
            (Ns::Pskc, "KeyReference") => set_once(&mut key.key_reference, t(), c)?,
            (Ns::Pskc, "FriendlyName") => set_once(&mut key.friendly_name, t(), c)?,
            (Ns::Pskc, "UserId") => set_once(&mut key.user_id, t(), c)?,
            (Ns::Pskc, "AlgorithmParameters") => {
                if std::mem::replace(&mut seen_params, true) {
                    return Err(E::DuplicateElement(c.qname()));
                }
                key.algorithm_parameters = parse_algorithm_parameters(c, ignored, max)?;
            }
            (Ns::Pskc, "Data") => {
                if std::mem::replace(&mut seen_data, true) {
                    return Err(E::DuplicateElement(c.qname()));
                }
                key.data = parse_data(c, ignored, max)?;
            }
            (Ns::Pskc, "Policy") => {
                if std::mem::replace(&mut seen_policy, true) {
                    return Err(E::DuplicateElement(c.qname()));
                }
                key.policy = parse_policy(c, ignored, max)?;
            }
            _ => unknown(c, ignored, max)?,
        }
    }
    Ok(key)
}

fn parse_algorithm_parameters(
    node: &Node,
    ignored: &mut Vec<String>,
    max: usize,
) -> Result<AlgorithmParameters, E> {
    let mut p = AlgorithmParameters::default();
    for c in &node.children {
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "Suite") => set_once(&mut p.suite, c.text().to_owned(), c)?,
            (Ns::Pskc, "ChallengeFormat") => p.challenge_format = true,
            (Ns::Pskc, "ResponseFormat") => {
                let length = attr_int::<u32>(c, "Length")?
                    .ok_or_else(|| invalid("ResponseFormat", "no Length attribute"))?;
                let encoding = Encoding::parse(
                    c.attr("Encoding")
                        .ok_or_else(|| invalid("ResponseFormat", "no Encoding attribute"))?
                        .trim(),
                );
                let check_digits = match c.attr("CheckDigits").map(str::trim) {
                    None | Some("false") | Some("0") => false,
                    Some("true") | Some("1") => true,
                    Some(_) => return Err(invalid("ResponseFormat/@CheckDigits", "not a boolean")),
                };
                set_once(
                    &mut p.response_format,
                    ResponseFormat {
                        length,
                        encoding,
                        check_digits,
                    },
                    c,
                )?;
            }
            _ => unknown(c, ignored, max)?,
        }
    }
    Ok(p)
}

/// The children of a data element or `MACKey`: PlainValue / EncryptedValue / ValueMAC.
struct RawValue<'a> {
    plain: Option<&'a Node>,
    encrypted: Option<EncryptedValue>,
    mac: Option<Vec<u8>>,
}

fn parse_raw_value<'a>(
    node: &'a Node,
    ignored: &mut Vec<String>,
    max: usize,
) -> Result<RawValue<'a>, E> {
    let mut v = RawValue {
        plain: None,
        encrypted: None,
        mac: None,
    };
    for c in &node.children {
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "PlainValue") => set_once(&mut v.plain, c, c)?,
            (Ns::Pskc, "EncryptedValue") => set_once(
                &mut v.encrypted,
                parse_encrypted_value(c).map_err(|d| invalid("EncryptedValue", d))?,
                c,
            )?,
            (Ns::Pskc, "ValueMAC") => set_once(
                &mut v.mac,
                b64(c.text()).map_err(|d| invalid("ValueMAC", d))?,
                c,
            )?,
            _ => unknown(c, ignored, max)?,
        }
    }
    if v.plain.is_some() && v.encrypted.is_some() {
        return Err(invalid(&node.name, "both PlainValue and EncryptedValue"));
    }
    if v.plain.is_none() && v.encrypted.is_none() {
        return Err(invalid(&node.name, "neither PlainValue nor EncryptedValue"));
    }
    Ok(v)
}

/// An `EncryptedValue` / `MACKey`: `xenc:EncryptionMethod` and `xenc:CipherData`.
pub(crate) fn parse_encrypted_value(node: &Node) -> Result<EncryptedValue, String> {
    let mut algorithm = None;
    let mut cipher = None;
    let mut oaep_digest = None;
    let mut oaep_params = None;
    for c in &node.children {
        if c.is(Ns::Xenc, "EncryptionMethod") {
            if algorithm.is_some() {
                return Err("two EncryptionMethod elements".into());
            }
            let uri = c
                .attr("Algorithm")
                .ok_or("EncryptionMethod has no Algorithm")?;
            algorithm = Some(EncryptionAlgorithm::from_uri(uri.trim()));
            for m in &c.children {
                if m.is(Ns::Ds, "DigestMethod") {
                    oaep_digest = m.attr("Algorithm").map(|a| a.trim().to_owned());
                } else if m.is(Ns::Xenc, "OAEPparams") {
                    oaep_params = Some(b64(m.text()).map_err(|e| format!("OAEPparams {e}"))?);
                } else if m.is(Ns::Xenc, "KeySize") || m.is_ignorable() {
                } else {
                    return Err(format!("unknown element {} in EncryptionMethod", m.qname()));
                }
            }
        } else if c.is(Ns::Xenc, "CipherData") {
            for cc in &c.children {
                if cc.is(Ns::Xenc, "CipherValue") {
                    if cipher.is_some() {
                        return Err("two CipherValue elements".into());
                    }
                    cipher = Some(b64(cc.text()).map_err(|e| format!("CipherValue {e}"))?);
                } else if cc.is(Ns::Xenc, "CipherReference") {
                    return Err("CipherReference (external cipher data) is not supported".into());
                } else if !cc.is_ignorable() {
                    return Err(format!("unknown element {} in CipherData", cc.qname()));
                }
            }
        } else if c.is(Ns::Ds, "KeyInfo")
            || c.is(Ns::Xenc, "EncryptionProperties")
            || c.is_ignorable()
        {
            // Recorded nowhere: the key is the container's EncryptionKey.
        } else {
            return Err(format!("unknown element {}", c.qname()));
        }
    }
    Ok(EncryptedValue {
        id: node.attr("Id").map(str::to_owned),
        algorithm: algorithm.ok_or("no EncryptionMethod")?,
        cipher_value: cipher.ok_or("no CipherData/CipherValue")?,
        oaep_digest,
        oaep_params,
    })
}

fn parse_int_value(node: &Node, ignored: &mut Vec<String>, max: usize) -> Result<IntValue, E> {
    let raw = parse_raw_value(node, ignored, max)?;
    if let Some(p) = raw.plain {
        if raw.mac.is_some() {
            return Err(invalid(&node.name, "ValueMAC on a PlainValue"));
        }
        return Ok(IntValue::Plain(int::<i64>(p, &node.name)?));
    }
    Ok(IntValue::Encrypted {
        value: raw.encrypted.expect("checked by parse_raw_value"),
        mac: raw.mac,
    })
}

fn parse_data(node: &Node, ignored: &mut Vec<String>, max: usize) -> Result<Data, E> {
    let mut d = Data::default();
    for c in &node.children {
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "Secret") => {
                let raw = parse_raw_value(c, ignored, max)?;
                let v = if let Some(p) = raw.plain {
                    if raw.mac.is_some() {
                        return Err(invalid("Secret", "ValueMAC on a PlainValue"));
                    }
                    SecretValue::Plain(SecretBytes::new(
                        b64(p.text()).map_err(|e| invalid("Secret/PlainValue", e))?,
                    ))
                } else {
                    SecretValue::Encrypted {
                        value: raw.encrypted.expect("checked by parse_raw_value"),
                        mac: raw.mac,
                    }
                };
                set_once(&mut d.secret, v, c)?;
            }
            (Ns::Pskc, "Counter") => {
                let v = parse_int_value(c, ignored, max)?;
                if matches!(v, IntValue::Plain(n) if n < 0) {
                    return Err(invalid("Counter", "negative"));
                }
                set_once(&mut d.counter, v, c)?
            }
            (Ns::Pskc, "Time") => set_once(&mut d.time, parse_int_value(c, ignored, max)?, c)?,
            (Ns::Pskc, "TimeInterval") => {
                let v = parse_int_value(c, ignored, max)?;
                if matches!(v, IntValue::Plain(n) if n <= 0) {
                    return Err(invalid("TimeInterval", "not positive"));
                }
                set_once(&mut d.time_interval, v, c)?
            }
            (Ns::Pskc, "TimeDrift") => {
                set_once(&mut d.time_drift, parse_int_value(c, ignored, max)?, c)?
            }
            _ => unknown(c, ignored, max)?,
        }
    }
    Ok(d)
}

fn parse_policy(node: &Node, ignored: &mut Vec<String>, max: usize) -> Result<Policy, E> {
    let mut p = Policy::default();
    for c in &node.children {
        match (c.ns(), c.name.as_str()) {
            (Ns::Pskc, "StartDate") => set_once(&mut p.start_date, date(c)?, c)?,
            (Ns::Pskc, "ExpiryDate") => set_once(&mut p.expiry_date, date(c)?, c)?,
            (Ns::Pskc, "KeyUsage") => p.key_usage.push(KeyUsage::parse(c.text())),
            (Ns::Pskc, "NumberOfTransactions") => set_once(
                &mut p.number_of_transactions,
                int::<u64>(c, "NumberOfTransactions")?,
                c,
            )?,
            (Ns::Pskc, "PINPolicy") => {
                let usage_mode = match c.attr("PINUsageMode").map(str::trim) {
                    Some("Local") => PinUsageMode::Local,
                    Some("Prepend") => PinUsageMode::Prepend,
                    Some("Append") => PinUsageMode::Append,
                    Some("Algorithmic") => PinUsageMode::Algorithmic,
                    Some(other) => PinUsageMode::Other(other.to_owned()),
                    None => return Err(invalid("PINPolicy", "no PINUsageMode attribute")),
                };
                let pp = PinPolicy {
                    pin_key_id: c.attr("PINKeyId").map(|s| s.trim().to_owned()),
                    usage_mode,
                    max_failed_attempts: attr_int(c, "MaxFailedAttempts")?,
                    min_length: attr_int(c, "MinLength")?,
                    max_length: attr_int(c, "MaxLength")?,
                    encoding: c.attr("PINEncoding").map(|s| Encoding::parse(s.trim())),
                };
                for cc in &c.children {
                    unknown(cc, ignored, max)?;
                }
                set_once(&mut p.pin_policy, pp, c)?;
            }
            _ => unknown(c, ignored, max)?,
        }
    }
    Ok(p)
}

// ---------------------------------------------------------------------------
// Header.

fn header_err(s: impl Into<String>) -> Error {
    Error::Header(s.into())
}

fn parse_encryption_key(node: &Node) -> Result<EncryptionKey, Error> {
    let mut out = None;
    for c in &node.children {
        let v = if c.is(Ns::Ds, "KeyName") {
            EncryptionKey::KeyName(c.text().to_owned())
        } else if c.is(Ns::Xenc11, "DerivedKey") {
            EncryptionKey::DerivedKey(parse_derived_key(c)?)
        } else if c.is(Ns::Ds, "X509Data") {
            let mut certificates = Vec::new();
            for cc in &c.children {
                if cc.is(Ns::Ds, "X509Certificate") {
                    certificates.push(
                        b64(cc.text()).map_err(|e| header_err(format!("X509Certificate {e}")))?,
                    );
                }
            }
            if certificates.is_empty() {
                return Err(header_err("X509Data without X509Certificate"));
            }
            EncryptionKey::X509 { certificates }
        } else if c.is_ignorable() {
            continue;
        } else {
            return Err(header_err(format!(
                "unsupported EncryptionKey content {}",
                c.qname()
            )));
        };
        if out.is_some() {
            return Err(header_err("EncryptionKey names more than one key"));
        }
        out = Some(v);
    }
    out.ok_or_else(|| header_err("empty EncryptionKey"))
}

fn parse_derived_key(node: &Node) -> Result<DerivedKey, Error> {
    let mut params = None;
    let mut master_key_name = None;
    for c in &node.children {
        if c.is(Ns::Xenc11, "KeyDerivationMethod") {
            let alg = c.attr("Algorithm").unwrap_or("").trim();
            if alg != "http://www.rsasecurity.com/rsalabs/pkcs/schemas/pkcs-5v2-0#pbkdf2" {
                return Err(header_err(format!(
                    "unsupported KeyDerivationMethod {alg:?} (only PBKDF2)"
                )));
            }
            for cc in &c.children {
                if cc.is(Ns::Pkcs5, "PBKDF2-params") {
                    params = Some(parse_pbkdf2(cc)?);
                } else if !cc.is_ignorable() {
                    return Err(header_err(format!("unknown element {}", cc.qname())));
                }
            }
        } else if c.is(Ns::Xenc11, "MasterKeyName") {
            master_key_name = Some(c.text().to_owned());
        } else if c.is(Ns::Xenc, "ReferenceList")
            || c.is(Ns::Xenc11, "CarriedKeyName")
            || c.is_ignorable()
        {
        } else {
            return Err(header_err(format!(
                "unknown element {} in DerivedKey",
                c.qname()
            )));
        }
    }
    let (salt, iteration_count, key_length, prf) =
        params.ok_or_else(|| header_err("DerivedKey without PBKDF2-params"))?;
    Ok(DerivedKey {
        id: node.attr("Id").map(str::to_owned),
        master_key_name,
        salt,
        iteration_count,
        key_length,
        prf,
    })
}

/// The PBKDF2-params children are unqualified in RFC 6030's figure 7; accept them
/// in no namespace or in the PKCS #5 namespace.
fn parse_pbkdf2(node: &Node) -> Result<(Vec<u8>, u32, Option<usize>, Prf), Error> {
    let mut salt = None;
    let mut iterations = None;
    let mut key_length = None;
    let mut prf = Prf::HmacSha1;
    for c in &node.children {
        if !matches!(c.ns(), Ns::None | Ns::Pkcs5) {
            if c.is_ignorable() {
                continue;
            }
            return Err(header_err(format!(
                "unknown element {} in PBKDF2-params",
                c.qname()
            )));
        }
        match c.name.as_str() {
            "Salt" => {
                let spec = c
                    .children
                    .iter()
                    .find(|s| s.name == "Specified")
                    .ok_or_else(|| {
                        header_err("Salt without Specified (OtherSource is not supported)")
                    })?;
                salt = Some(b64(spec.text()).map_err(|e| header_err(format!("Salt {e}")))?);
            }
            "IterationCount" => {
                let n: u32 = c
                    .text()
                    .parse()
                    .map_err(|_| header_err("IterationCount is not an integer"))?;
                if n == 0 {
                    return Err(header_err("IterationCount is 0"));
                }
                iterations = Some(n);
            }
            "KeyLength" => {
                let n: usize = c
                    .text()
                    .parse()
                    .map_err(|_| header_err("KeyLength is not an integer"))?;
                if !matches!(n, 16 | 24 | 32) {
                    return Err(header_err(format!(
                        "KeyLength {n} (an AES key is 16, 24 or 32 bytes)"
                    )));
                }
                key_length = Some(n);
            }
            "PRF" => {
                prf = match c.attr("Algorithm").map(str::trim) {
                    None | Some("") | Some("http://www.w3.org/2000/09/xmldsig#hmac-sha1") => {
                        Prf::HmacSha1
                    }
                    Some("http://www.w3.org/2001/04/xmldsig-more#hmac-sha256") => Prf::HmacSha256,
                    Some(other) => {
                        return Err(header_err(format!("unsupported PBKDF2 PRF {other:?}")))
                    }
                };
            }
            other => {
                return Err(header_err(format!(
                    "unknown element {other} in PBKDF2-params"
                )))
            }
        }
    }
    Ok((
        salt.ok_or_else(|| header_err("PBKDF2-params without Salt"))?,
        iterations.ok_or_else(|| header_err("PBKDF2-params without IterationCount"))?,
        key_length,
        prf,
    ))
}

fn parse_mac_method(node: &Node) -> Result<MacMethod, Error> {
    let uri = node.attr("Algorithm").unwrap_or("").trim();
    let algorithm = MacAlgorithm::from_uri(uri)
        .ok_or_else(|| header_err(format!("unsupported MACMethod Algorithm {uri:?}")))?;
    let mut mac_key = None;
    for c in &node.children {
        if c.is(Ns::Pskc, "MACKey") {
            if mac_key.is_some() {
                return Err(header_err("two MACKey elements"));
            }
            let v = parse_encrypted_value(c).map_err(|e| header_err(format!("MACKey: {e}")))?;
            if let EncryptionAlgorithm::Unknown(u) = &v.algorithm {
                return Err(header_err(format!(
                    "unsupported MACKey EncryptionMethod {u:?}"
                )));
            }
            mac_key = Some(v);
        } else if c.is(Ns::Pskc, "MACKeyReference") {
            return Err(header_err(
                "MACKeyReference (MAC key out of band) is not supported",
            ));
        } else if !c.is_ignorable() {
            return Err(header_err(format!(
                "unknown element {} in MACMethod",
                c.qname()
            )));
        }
    }
    Ok(MacMethod { algorithm, mac_key })
}

/// A whole document read at once ([`parse_all`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct Document {
    /// The header.
    pub header: Header,
    /// Every package, in file order.
    pub entries: Vec<Result<KeyPackage, EntryError>>,
    /// What followed the packages.
    pub trailer: Trailer,
}

/// Reads a whole document into memory (for small files, tests and fuzzing; the
/// streaming [`Reader`] is for real imports).
pub fn parse_all<R: BufRead>(input: R, options: Options) -> Result<Document, Error> {
    let mut r = Reader::with_options(input, options)?;
    let mut entries = Vec::new();
    while let Some(e) = r.next_entry()? {
        entries.push(e);
    }
    Ok(Document {
        header: r.header.clone(),
        entries,
        trailer: r.trailer.clone(),
    })
}
