//! Parses a PSKC file, checks every MAC and decrypts every secret in software,
//! and prints the counts and the rate.
//!
//! `cargo run -p pskc --release --example check -- FILE.pskc PSK.hex`

use std::io::BufReader;
use std::time::Instant;

use pskc::crypto::Decryptor;
use pskc::{Reader, SecretBytes};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(file), Some(psk)) = (args.first(), args.get(1)) else {
        eprintln!("usage: check FILE.pskc PSK.hex");
        std::process::exit(2);
    };
    let hex = std::fs::read_to_string(psk)?;
    let hex = hex.trim();
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let t = Instant::now();
    let mut r = Reader::new(BufReader::with_capacity(
        1 << 16,
        std::fs::File::open(file)?,
    ))?;
    let dec = Decryptor::from_psk(r.header(), SecretBytes::new(key))?;
    let (mut ok, mut refused) = (0u64, 0u64);
    while let Some(e) = r.next_entry()? {
        match e.map_err(|e| e.to_string()).and_then(|p| {
            let s = p.key.data.secret.as_ref().ok_or("no secret")?;
            dec.secret(s).map_err(|e| e.to_string())
        }) {
            Ok(_) => ok += 1,
            Err(_) => refused += 1,
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{ok} ok, {refused} refused in {s:.2} s: {:.0} entries/s",
        (ok + refused) as f64 / s
    );
    Ok(())
}
