//! Writes a synthetic encrypted PSKC file with known seeds (see `pskc::testdata`).
//!
//! `cargo run -p pskc --example generate -- ENTRIES OUT.pskc [PSK-OUT.hex]`
//! writes ENTRIES AES-128-CBC/HMAC-SHA1 entries to OUT.pskc and, when given, the
//! transport key as hex to PSK-OUT.hex (what `hsmctl credential import --psk-file` reads).

use std::io::{BufWriter, Write};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(n), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: generate ENTRIES OUT.pskc [PSK-OUT.hex]");
        std::process::exit(2);
    };
    let n: u64 = n.parse().map_err(std::io::Error::other)?;
    let spec = pskc::testdata::Spec::new(n);
    let f = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    pskc::testdata::write_encrypted(f, &spec)?;
    if let Some(p) = args.get(2) {
        let hex: String = spec
            .transport_key()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut f = std::fs::File::create(p)?;
        writeln!(f, "{hex}")?;
    }
    Ok(())
}
