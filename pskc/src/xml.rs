//! The XML layer: a bounded, DTD-refusing, namespace-aware event source on top of
//! quick-xml, and a small element tree built for one top-level element at a time.
//!
//! Memory bounds: [`Guard`] sits between the input and quick-xml and follows the
//! markup with a small state machine, so no single event (tag, text run, comment,
//! CDATA section, processing instruction) can exceed [`Limits::max_event_bytes`]
//! before quick-xml has buffered it; a `<!DOCTYPE` is refused as soon as its first
//! letter is seen. The tree of one KeyPackage is bounded by
//! [`Limits::max_package_nodes`], [`Limits::max_text_bytes`] and
//! [`Limits::max_depth`].

use std::io::{self, BufRead, Read};

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use zeroize::{Zeroize, Zeroizing};

use crate::types::{NS_DS, NS_PKCS5, NS_PSKC, NS_XENC, NS_XENC11};
use crate::{Error, Limits};

/// Which namespace an element is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    Pskc,
    Ds,
    Xenc,
    Xenc11,
    Pkcs5,
    /// No namespace (PBKDF2-params children are unqualified).
    None,
    /// Any other namespace (its URI in [`Node::other_ns`]).
    Other,
}

impl Ns {
    fn from_uri(uri: &[u8]) -> Ns {
        match uri {
            u if u == NS_PSKC.as_bytes() => Ns::Pskc,
            u if u == NS_DS.as_bytes() => Ns::Ds,
            u if u == NS_XENC.as_bytes() => Ns::Xenc,
            u if u == NS_XENC11.as_bytes() => Ns::Xenc11,
            u if u == NS_PKCS5.as_bytes() => Ns::Pkcs5,
            _ => Ns::Other,
        }
    }
}

/// One element with its unqualified attributes, its text and its children.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub ns: Option<Ns>,
    pub other_ns: Option<String>,
    pub name: String,
    /// Attributes without a prefix (namespace declarations and prefixed
    /// attributes such as `xsi:schemaLocation` are dropped).
    pub attrs: Vec<(String, String)>,
    /// Concatenated character data (zeroized on drop: it may be a PlainValue).
    pub text: Zeroizing<String>,
    pub children: Vec<Node>,
}

impl Node {
    pub fn ns(&self) -> Ns {
        self.ns.unwrap_or(Ns::None)
    }

    pub fn is(&self, ns: Ns, name: &str) -> bool {
        self.ns() == ns && self.name == name
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> &str {
        self.text.trim()
    }

    /// Name for messages and the `ignored` lists: `pskc:Name`, `ds:Name`, `{uri}Name`.
    pub fn qname(&self) -> String {
        let p = match self.ns() {
            Ns::Pskc => "pskc:",
            Ns::Ds => "ds:",
            Ns::Xenc => "xenc:",
            Ns::Xenc11 => "xenc11:",
            Ns::Pkcs5 => "pkcs5:",
            Ns::None => "",
            Ns::Other => {
                return format!(
                    "{{{}}}{}",
                    self.other_ns.as_deref().unwrap_or(""),
                    self.name
                )
            }
        };
        format!("{p}{}", self.name)
    }

    /// Elements that are skipped and recorded rather than refused: `pskc:Extensions`
    /// and anything outside the namespaces RFC 6030 uses.
    pub fn is_ignorable(&self) -> bool {
        self.ns() == Ns::Other || self.is(Ns::Pskc, "Extensions")
    }
}

/// Tokenizer states of [`Guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Text,
    Lt,
    Bang,
    BangDash,
    Tag(Option<u8>),
    Comment(u8),
    CData(u8),
    Pi(bool),
}

/// Why [`Guard`] stopped the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trip {
    Doctype,
    Event,
    Total,
}

/// A `BufRead` adapter that bounds every XML event and the whole document, and
/// refuses `<!DOCTYPE` before quick-xml reads it.
pub(crate) struct Guard<R> {
    inner: R,
    lex: Lexer,
}

struct Lexer {
    state: Lex,
    run: u64,
    max_run: u64,
    total: u64,
    max_total: Option<u64>,
    tripped: Option<Trip>,
}

impl<R: BufRead> Guard<R> {
    fn new(inner: R, limits: &Limits) -> Self {
        Guard {
            inner,
            lex: Lexer {
                state: Lex::Text,
                run: 0,
                max_run: limits.max_event_bytes as u64,
                total: 0,
                max_total: limits.max_document_bytes,
                tripped: None,
            },
        }
    }

    pub fn tripped(&self) -> Option<Trip> {
        self.lex.tripped
    }
}

impl Lexer {
    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.run += 1;
            self.state = match self.state {
                Lex::Text => {
                    if b == b'<' {
                        self.run = 0;
                        Lex::Lt
                    } else {
                        Lex::Text
                    }
                }
                Lex::Lt => match b {
                    b'!' => Lex::Bang,
                    b'?' => Lex::Pi(false),
                    b'>' => {
                        self.run = 0;
                        Lex::Text
                    }
                    b'"' | b'\'' => Lex::Tag(Some(b)),
                    _ => Lex::Tag(None),
                },
                Lex::Bang => match b {
                    b'-' => Lex::BangDash,
                    b'[' => Lex::CData(0),
                    b'D' | b'd' => {
                        self.tripped = Some(Trip::Doctype);
                        return;
                    }
                    _ => Lex::Tag(None),
                },
                Lex::BangDash => {
                    if b == b'-' {
                        Lex::Comment(0)
                    } else {
                        Lex::Tag(None)
                    }
                }
                Lex::Comment(d) => match b {
                    b'-' => Lex::Comment(d.saturating_add(1)),
                    b'>' if d >= 2 => {
                        self.run = 0;
                        Lex::Text
                    }
                    _ => Lex::Comment(0),
                },
                Lex::CData(d) => match b {
                    b']' => Lex::CData(d.saturating_add(1)),
                    b'>' if d >= 2 => {
                        self.run = 0;
                        Lex::Text
                    }
                    _ => Lex::CData(0),
                },
                Lex::Pi(q) => match b {
                    b'>' if q => {
                        self.run = 0;
                        Lex::Text
                    }
                    b'?' => Lex::Pi(true),
                    _ => Lex::Pi(false),
                },
                Lex::Tag(Some(q)) => {
                    if b == q {
                        Lex::Tag(None)
                    } else {
                        Lex::Tag(Some(q))
                    }
                }
                Lex::Tag(None) => match b {
                    b'"' | b'\'' => Lex::Tag(Some(b)),
                    b'>' => {
                        self.run = 0;
                        Lex::Text
                    }
                    _ => Lex::Tag(None),
                },
            };
            if self.run > self.max_run {
                self.tripped = Some(Trip::Event);
                return;
            }
        }
    }
}

impl<R: BufRead> Read for Guard<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let b = self.fill_buf()?;
            let n = b.len().min(out.len());
            out[..n].copy_from_slice(&b[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Guard<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.lex.tripped.is_some() {
            return Err(io::Error::other("PSKC input limit"));
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if amt == 0 {
            return;
        }
        self.lex.total += amt as u64;
        if let Some(max) = self.lex.max_total {
            if self.lex.total > max {
                self.lex.tripped = Some(Trip::Total);
            }
        }
        // The bytes being consumed are the front of the buffer the last fill_buf
        // returned; a BufRead returns that same buffer again without reading.
        if let Ok(b) = self.inner.fill_buf() {
            let n = amt.min(b.len());
            self.lex.scan(&b[..n]);
        }
        self.inner.consume(amt);
    }
}

/// One event of interest.
pub(crate) enum Ev {
    Start(Node),
    End,
    Text(Zeroizing<String>),
    Eof,
}

/// The bounded event source.
pub(crate) struct Xml<R: BufRead> {
    reader: NsReader<Guard<R>>,
    buf: Vec<u8>,
    pub limits: Limits,
    pub depth: usize,
    /// An `Empty` event was returned as `Start`; its `End` is due.
    pending_end: bool,
}

impl<R: BufRead> Xml<R> {
    pub fn new(input: R, limits: Limits) -> Self {
        let mut reader = NsReader::from_reader(Guard::new(input, &limits));
        {
            let c = reader.config_mut();
            c.expand_empty_elements = true;
            c.check_end_names = true;
            c.check_comments = true;
            c.trim_text(false);
        }
        reader.resolver_mut().set_max_declarations_per_element(32);
        Xml {
            reader,
            buf: Vec::with_capacity(1024),
            limits,
            depth: 0,
            pending_end: false,
        }
    }

    pub fn position(&self) -> u64 {
        self.reader.buffer_position()
    }

    fn map_err(&mut self, e: quick_xml::Error) -> Error {
        match self.reader.get_mut().tripped() {
            Some(Trip::Doctype) => Error::Doctype {
                position: self.position(),
            },
            Some(Trip::Event) => Error::Limit {
                what: "bytes in one XML event (tag, text, comment)",
                limit: self.limits.max_event_bytes as u64,
            },
            Some(Trip::Total) => Error::Limit {
                what: "document bytes",
                limit: self.limits.max_document_bytes.unwrap_or(0),
            },
            None => match e {
                quick_xml::Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
                other => Error::Xml {
                    position: self.reader.error_position(),
                    detail: other.to_string(),
                },
            },
        }
    }

    /// The next event (comments, PIs and the declaration are consumed here).
    pub fn next(&mut self) -> Result<Ev, Error> {
        if std::mem::take(&mut self.pending_end) {
            self.depth = self.depth.saturating_sub(1);
            return Ok(Ev::End);
        }
        loop {
            self.buf.zeroize();
            let ev = match self.reader.read_resolved_event_into(&mut self.buf) {
                Ok((res, ev)) => {
                    let ns = match res {
                        ResolveResult::Bound(ns) => Some(ns.0.to_vec()),
                        ResolveResult::Unbound => None,
                        ResolveResult::Unknown(p) => {
                            return Err(Error::Xml {
                                position: self.reader.buffer_position(),
                                detail: format!(
                                    "undeclared namespace prefix {:?}",
                                    String::from_utf8_lossy(&p)
                                ),
                            })
                        }
                    };
                    (ns, ev.into_owned())
                }
                Err(e) => return Err(self.map_err(e)),
            };
            let position = self.position();
            if matches!(ev.1, Event::Empty(_)) {
                self.pending_end = true;
            }
            match ev {
                (_, Event::Decl(d)) => {
                    if let Some(enc) = d.encoding() {
                        let enc = enc.map_err(|e| Error::Xml {
                            position,
                            detail: e.to_string(),
                        })?;
                        let enc = String::from_utf8_lossy(&enc).to_string();
                        if !enc.eq_ignore_ascii_case("utf-8") && !enc.eq_ignore_ascii_case("utf8") {
                            return Err(Error::Encoding(enc));
                        }
                    }
                }
                (_, Event::DocType(_)) => return Err(Error::Doctype { position }),
                (_, Event::PI(_)) | (_, Event::Comment(_)) => {}
                (ns, Event::Start(e)) | (ns, Event::Empty(e)) => {
                    self.depth += 1;
                    if self.depth > self.limits.max_depth {
                        return Err(Error::Limit {
                            what: "element nesting depth",
                            limit: self.limits.max_depth as u64,
                        });
                    }
                    let mut node = Node {
                        name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                        ..Node::default()
                    };
                    if let Some(uri) = ns {
                        let n = Ns::from_uri(&uri);
                        if n == Ns::Other {
                            node.other_ns = Some(String::from_utf8_lossy(&uri).into_owned());
                        }
                        node.ns = Some(n);
                    }
                    for a in e.attributes() {
                        let a = a.map_err(|err| Error::Xml {
                            position,
                            detail: err.to_string(),
                        })?;
                        let key = a.key.as_ref();
                        if key.starts_with(b"xmlns") || key.contains(&b':') {
                            continue;
                        }
                        if node.attrs.len() >= self.limits.max_attributes {
                            return Err(Error::Limit {
                                what: "attributes on one element",
                                limit: self.limits.max_attributes as u64,
                            });
                        }
                        let v = a
                            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .map_err(|err| match err {
                                quick_xml::Error::Escape(
                                    quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                                ) => Error::Entity { name, position },
                                other => Error::Xml {
                                    position,
                                    detail: other.to_string(),
                                },
                            })?;
                        node.attrs
                            .push((String::from_utf8_lossy(key).into_owned(), v.into_owned()));
                    }
                    return Ok(Ev::Start(node));
                }
                (_, Event::End(_)) => {
                    self.depth = self.depth.saturating_sub(1);
                    return Ok(Ev::End);
                }
                (_, Event::Text(t)) => {
                    let s = t.xml10_content().map_err(|e| Error::Xml {
                        position,
                        detail: e.to_string(),
                    })?;
                    return Ok(Ev::Text(Zeroizing::new(s.into_owned())));
                }
                (_, Event::CData(t)) => {
                    let s = t.xml10_content().map_err(|e| Error::Xml {
                        position,
                        detail: e.to_string(),
                    })?;
                    return Ok(Ev::Text(Zeroizing::new(s.into_owned())));
                }
                (_, Event::GeneralRef(r)) => {
                    if r.is_char_ref() {
                        match r.resolve_char_ref() {
                            Ok(Some(c)) => return Ok(Ev::Text(Zeroizing::new(c.to_string()))),
                            Ok(None) | Err(_) => {
                                return Err(Error::Xml {
                                    position,
                                    detail: "invalid character reference".into(),
                                })
                            }
                        }
                    }
                    let name = String::from_utf8_lossy(&r).into_owned();
                    match quick_xml::escape::resolve_predefined_entity(&name) {
                        Some(s) => return Ok(Ev::Text(Zeroizing::new(s.to_owned()))),
                        None => return Err(Error::Entity { name, position }),
                    }
                }
                (_, Event::Eof) => {
                    if self.depth > 0 {
                        return Err(Error::Xml {
                            position,
                            detail: "unexpected end of file (truncated document)".into(),
                        });
                    }
                    return Ok(Ev::Eof);
                }
            }
        }
    }

    /// Reads the rest of the element whose start was `node` (children, text, end),
    /// counting nodes against `budget`.
    pub fn subtree(&mut self, mut node: Node, budget: &mut usize) -> Result<Node, Error> {
        loop {
            match self.next()? {
                Ev::Start(child) => {
                    if *budget == 0 {
                        return Err(Error::Limit {
                            what: "elements in one KeyPackage or header element",
                            limit: self.limits.max_package_nodes as u64,
                        });
                    }
                    *budget -= 1;
                    let child = self.subtree(child, budget)?;
                    node.children.push(child);
                }
                Ev::Text(t) => {
                    if node.text.len() + t.len() > self.limits.max_text_bytes {
                        return Err(Error::Limit {
                            what: "text bytes in one element",
                            limit: self.limits.max_text_bytes as u64,
                        });
                    }
                    node.text.push_str(&t);
                }
                Ev::End => return Ok(node),
                Ev::Eof => {
                    return Err(Error::Xml {
                        position: self.position(),
                        detail: "unexpected end of file (truncated document)".into(),
                    })
                }
            }
        }
    }
}

impl<R: BufRead> Drop for Xml<R> {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}
