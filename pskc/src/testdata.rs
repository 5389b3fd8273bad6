//! A generator of synthetic encrypted PSKC files with known seeds, for tests,
//! benches (the 1,000,000-entry import) and fuzz corpora.
//!
//! Entry `i` has `Key/@Id` [`key_id`]`(prefix, i)`, `DeviceInfo/SerialNo`
//! [`serial_no`]`(i)`, the 20-byte seed [`seed`]`(i)`, counter 0, 6 DECIMAL
//! digits, HOTP (or TOTP every `totp_every`-th entry, 30 s). The seed is
//! encrypted with AES-CBC under [`TRANSPORT_KEY`] (truncated to the algorithm's
//! key length) and MACed with [`MAC_KEY`] (itself encrypted in `MACMethod/MACKey`).
//! Nothing here is secret: the keys are published test constants.

use std::io::{self, Write};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::crypto::{encrypt_cbc, mac};
use crate::types::{EncryptionAlgorithm, MacAlgorithm};

/// The test transport key (32 bytes; AES-128 uses the first 16, AES-192 the first 24).
pub const TRANSPORT_KEY: [u8; 32] = *b"pskc-testdata-transport-key-0001";
/// The test MAC key.
pub const MAC_KEY: [u8; 20] = *b"pskc-testdata-mackey";

/// What to generate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Spec {
    /// Number of KeyPackages.
    pub entries: u64,
    /// AES-CBC algorithm of the secrets and the MAC key.
    pub algorithm: EncryptionAlgorithm,
    /// MAC algorithm.
    pub mac: MacAlgorithm,
    /// Write a `ValueMAC` for each secret.
    pub with_value_mac: bool,
    /// Every n-th entry (n > 0) is TOTP instead of HOTP.
    pub totp_every: Option<u64>,
    /// Prefix of the key ids.
    pub id_prefix: String,
}

impl Spec {
    /// `entries` HOTP entries, AES-128-CBC, HMAC-SHA1, with MACs, ids `tok-00000000`...
    pub fn new(entries: u64) -> Self {
        Spec {
            entries,
            algorithm: EncryptionAlgorithm::Aes128Cbc,
            mac: MacAlgorithm::HmacSha1,
            with_value_mac: true,
            totp_every: None,
            id_prefix: "tok-".into(),
        }
    }

    /// Sets the cipher (AES-128/192/256-CBC).
    pub fn algorithm(mut self, a: EncryptionAlgorithm) -> Self {
        self.algorithm = a;
        self
    }

    /// Sets the MAC algorithm.
    pub fn mac(mut self, m: MacAlgorithm) -> Self {
        self.mac = m;
        self
    }

    /// Writes or omits the ValueMACs.
    pub fn with_value_mac(mut self, yes: bool) -> Self {
        self.with_value_mac = yes;
        self
    }

    /// Every n-th entry TOTP.
    pub fn totp_every(mut self, n: u64) -> Self {
        self.totp_every = (n > 0).then_some(n);
        self
    }

    /// Key id prefix.
    pub fn id_prefix(mut self, p: impl Into<String>) -> Self {
        self.id_prefix = p.into();
        self
    }

    /// The transport key for this spec's algorithm.
    pub fn transport_key(&self) -> Vec<u8> {
        TRANSPORT_KEY[..self.algorithm.aes_key_len().unwrap_or(16)].to_vec()
    }

    /// True when entry `i` is TOTP.
    pub fn is_totp(&self, i: u64) -> bool {
        self.totp_every.is_some_and(|n| i % n == n - 1)
    }
}

fn derive(label: &[u8], i: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label);
    h.update(i.to_be_bytes());
    h.finalize().into()
}

/// The seed of entry `i` (20 bytes).
pub fn seed(i: u64) -> [u8; 20] {
    let d = derive(b"pskc testdata seed", i);
    let mut s = [0u8; 20];
    s.copy_from_slice(&d[..20]);
    s
}

/// The key id of entry `i`.
pub fn key_id(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:08}")
}

/// The serial number of entry `i`.
pub fn serial_no(i: u64) -> String {
    format!("SN{i:08}")
}

fn iv(i: u64, label: &[u8]) -> [u8; 16] {
    let d = derive(label, i);
    let mut v = [0u8; 16];
    v.copy_from_slice(&d[..16]);
    v
}

/// Writes the file. `w` should be buffered.
pub fn write_encrypted<W: Write>(mut w: W, spec: &Spec) -> io::Result<()> {
    write_header(&mut w, spec)?;
    for i in 0..spec.entries {
        write_entry(&mut w, spec, i)?;
    }
    write_footer(&mut w)?;
    w.flush()
}

fn encrypt(spec: &Spec, i: u64, label: &[u8], pt: &[u8]) -> io::Result<Vec<u8>> {
    if !spec.algorithm.is_cbc() {
        return Err(io::Error::other("testdata: only AES-CBC is generated"));
    }
    encrypt_cbc(&spec.algorithm, &spec.transport_key(), &iv(i, label), pt).map_err(io::Error::other)
}

/// Writes the container start, `EncryptionKey` and `MACMethod` (for streaming
/// generators: then [`write_entry`] for each entry and [`write_footer`]).
pub fn write_header<W: Write>(mut w: W, spec: &Spec) -> io::Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mac_key = encrypt(spec, u64::MAX, b"pskc testdata mac key iv", &MAC_KEY)?;
    write!(
        w,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<KeyContainer Version="1.0" Id="testdata"
    xmlns="urn:ietf:params:xml:ns:keyprov:pskc"
    xmlns:ds="http://www.w3.org/2000/09/xmldsig#"
    xmlns:xenc="http://www.w3.org/2001/04/xmlenc#">
  <EncryptionKey><ds:KeyName>testdata-transport-key</ds:KeyName></EncryptionKey>
  <MACMethod Algorithm="{}">
    <MACKey>
      <xenc:EncryptionMethod Algorithm="{}"/>
      <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData>
    </MACKey>
  </MACMethod>
"#,
        spec.mac.uri(),
        spec.algorithm.uri(),
        b64.encode(mac_key)
    )
}

/// Writes KeyPackage `i`.
pub fn write_entry<W: Write>(mut w: W, spec: &Spec, i: u64) -> io::Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let cv = encrypt(spec, i, b"pskc testdata seed iv", &seed(i))?;
    let vm = if spec.with_value_mac {
        format!(
            "\n          <ValueMAC>{}</ValueMAC>",
            b64.encode(mac(spec.mac, &MAC_KEY, &cv))
        )
    } else {
        String::new()
    };
    let (algo, extra) = if spec.is_totp(i) {
        (
            "totp",
            "\n        <Time><PlainValue>0</PlainValue></Time>\n        <TimeInterval><PlainValue>30</PlainValue></TimeInterval>",
        )
    } else {
        (
            "hotp",
            "\n        <Counter><PlainValue>0</PlainValue></Counter>",
        )
    };
    write!(
        w,
        r#"  <KeyPackage>
    <DeviceInfo><Manufacturer>TestVendor</Manufacturer><SerialNo>{serial}</SerialNo></DeviceInfo>
    <Key Id="{id}" Algorithm="urn:ietf:params:xml:ns:keyprov:pskc:{algo}">
      <Issuer>TestIssuer</Issuer>
      <AlgorithmParameters><ResponseFormat Length="6" Encoding="DECIMAL"/></AlgorithmParameters>
      <Data>
        <Secret>
          <EncryptedValue>
            <xenc:EncryptionMethod Algorithm="{alg}"/>
            <xenc:CipherData><xenc:CipherValue>{cv}</xenc:CipherValue></xenc:CipherData>
          </EncryptedValue>{vm}
        </Secret>{extra}
      </Data>
    </Key>
  </KeyPackage>
"#,
        serial = serial_no(i),
        id = key_id(&spec.id_prefix, i),
        alg = spec.algorithm.uri(),
        cv = b64.encode(cv),
    )
}

/// Writes the end of the container.
pub fn write_footer<W: Write>(mut w: W) -> io::Result<()> {
    w.write_all(b"</KeyContainer>\n")
}
