//! RFC 6030 Portable Symmetric Key Container (PSKC): a streaming parser and its crypto.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use secrecy::ExposeSecret;
//! let file = std::io::BufReader::new(std::fs::File::open("seeds.pskc")?);
//! let mut reader = pskc::Reader::new(file)?;
//! let psk = pskc::SecretBytes::new(vec![0x12; 16]);
//! let dec = pskc::crypto::Decryptor::from_psk(reader.header(), psk)?;
//! while let Some(entry) = reader.next_entry()? {
//!     match entry {
//!         Ok(pkg) => {
//!             let secret = pkg.key.data.secret.as_ref().expect("checked by unsupported()");
//!             let (seed, _mac) = dec.secret(secret)?;
//!             let _ = seed.expose_secret();
//!         }
//!         Err(refused) => eprintln!("{refused}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Security rules
//!
//! - DTDs are refused outright (`<!DOCTYPE` is rejected before it is parsed), so
//!   there are no entity declarations, no external entities and no entity
//!   expansion; only the five predefined entities and character references are
//!   accepted. Only UTF-8 documents.
//! - [`Limits`]: nesting depth, bytes per XML event, text per element, attributes
//!   per element, elements per KeyPackage, optional entry count and document size.
//!   The reader holds one KeyPackage at a time (plus, for the duplicate-id check,
//!   16 bytes per id seen).
//! - Unknown elements: in the PSKC / xmlenc / xmlenc11 / xmldsig / PKCS #5
//!   namespaces where RFC 6030 does not define them: refused (entry error inside
//!   a KeyPackage, whole-file error in the header); `pskc:Extensions` and
//!   elements of other namespaces: skipped and recorded (`ignored`).
//! - A duplicate `Key/@Id` refuses the whole file ([`Error::DuplicateKeyId`]).
//! - Policy: see [`Policy::refusals`] and [`Key::unsupported`] for what is
//!   refused and what is recorded.
//! - `Signature` (RFC 6030 §7) is recorded in [`Trailer::signature`], not verified.
//! - For HSM-side decryption: [`EncryptedValue::cbc_parts`] gives IV and ciphertext
//!   (`CKM_AES_CBC_PAD` expects PKCS#7 padding; XML Encryption allows arbitrary pad
//!   bytes before the length byte, which [`crypto::decrypt_raw`] accepts), RSA
//!   values carry `oaep_digest`/`oaep_params`, and [`crypto::Decryptor::from_parts`]
//!   takes keys obtained elsewhere.
//! - Secrets are [`SecretBytes`] (zeroized, `Debug` redacted); errors never
//!   contain secret bytes. MACs are compared in constant time before decryption.

pub mod crypto;
mod error;
mod reader;
pub mod testdata;
mod time;
mod types;
mod xml;

pub use error::{CryptoError, EntryError, EntryErrorKind, Error};
pub use reader::{parse_all, Document, Limits, Options, Reader};
pub use time::parse_datetime;
pub use types::*;
