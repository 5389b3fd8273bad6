//! Streaming: a generated 100,000-entry file (about 90 MB, never materialised)
//! is parsed with bounded memory; the reader never reads ahead of the package it
//! yields.

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

use pskc::crypto::Decryptor;
use pskc::testdata::{key_id, seed, write_entry, write_footer, write_header, Spec};
use pskc::{Reader, SecretBytes};
use secrecy::ExposeSecret;

const N: u64 = 100_000;

/// Produces the file lazily, one KeyPackage's text at a time, and records how
/// far it has been asked to go.
struct Lazy {
    spec: Spec,
    buf: Vec<u8>,
    pos: usize,
    next: u64,
    done: bool,
    /// Index of the last entry produced (u64::MAX: header only).
    produced: Rc<Cell<u64>>,
    bytes: Rc<Cell<u64>>,
}

impl Lazy {
    fn refill(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.pos = 0;
        if self.next < self.spec.entries {
            write_entry(&mut self.buf, &self.spec, self.next)?;
            self.produced.set(self.next);
            self.next += 1;
        } else if !self.done {
            write_footer(&mut self.buf)?;
            self.done = true;
        }
        Ok(())
    }
}

impl Read for Lazy {
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

impl BufRead for Lazy {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.buf.len() {
            self.refill()?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt;
        self.bytes.set(self.bytes.get() + amt as u64);
    }
}

fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn hundred_thousand_entries_stream_with_bounded_memory() {
    let spec = Spec::new(N);
    let produced = Rc::new(Cell::new(u64::MAX));
    let bytes = Rc::new(Cell::new(0));
    let mut head = Vec::new();
    write_header(&mut head, &spec).unwrap();
    let lazy = Lazy {
        spec: spec.clone(),
        buf: head,
        pos: 0,
        next: 0,
        done: false,
        produced: produced.clone(),
        bytes: bytes.clone(),
    };
    let before = rss_kib();
    let mut r = Reader::new(lazy).unwrap();
    let dec = Decryptor::from_psk(r.header(), SecretBytes::new(spec.transport_key())).unwrap();
    let mut n = 0u64;
    while let Some(e) = r.next_entry().unwrap() {
        let p = e.unwrap();
        assert_eq!(p.index, n);
        // The source was never asked for more than the package being yielded:
        // the reader holds one KeyPackage at a time.
        assert_eq!(produced.get(), n, "the reader read ahead of package {n}");
        if n % 997 == 0 {
            assert_eq!(p.key.id, key_id("tok-", n));
            let (s, _) = dec.secret(p.key.data.secret.as_ref().unwrap()).unwrap();
            assert_eq!(s.expose_secret(), &seed(n)[..]);
        }
        n += 1;
    }
    assert_eq!(n, N);
    let total = bytes.get();
    assert!(total > 80_000_000, "the file is large: {total} bytes");
    if let (Some(b), Some(a)) = (before, rss_kib()) {
        let grown = a.saturating_sub(b);
        eprintln!("streamed {N} entries, {total} bytes; RSS {b} -> {a} KiB (+{grown} KiB)");
        // The duplicate-id set holds 16 bytes per id (about 3 MiB here with its
        // overhead); nothing else grows with the file.
        assert!(
            grown < 32 * 1024,
            "RSS grew by {grown} KiB while streaming {total} bytes"
        );
    }
}
