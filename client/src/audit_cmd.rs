//! `hsmctl audit ...`: export the trail (role auditor), fetch the checkpoint keys, and
//! verify an export offline.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use hsm_client::proto as pb;
use hsm_client::{ClientError, HsmClient};
use serde_json::json;

/// Audit subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Stream the records as JSON Lines (to stdout or --out).
    Export {
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Sign a checkpoint over the current head first, so the export ends covered.
        #[arg(long)]
        checkpoint: bool,
    },
    /// The checkpoint keys as JSON ({"key id": "hex public key"}), for `verify --keys`.
    Keys {
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Sign a checkpoint over the current head now.
    Checkpoint,
    /// Check an export offline: chain, sequence, checkpoint signatures. Exits 0 only when
    /// the log is intact; says exactly where a record was altered, removed or reordered.
    Verify {
        /// The exported JSON Lines file.
        file: PathBuf,
        /// The keys file written by `hsmctl audit keys` (not needed with --expect-key).
        #[arg(long, required_unless_present = "expect_key")]
        keys: Option<PathBuf>,
        /// Pin the checkpoint key, as kept out of band (e.g. from the key ceremony): its
        /// id and its uncompressed P-256 public key in hex. Then it is the only trusted
        /// key: a checkpoint by any other key is a problem.
        #[arg(long, value_name = "KEYID:HEX")]
        expect_key: Option<hsm_audit::KeyPin>,
        /// Verify a later segment from a value kept out of band: the seq and hash of the
        /// record just before the file's first line (a previous verification prints it).
        #[arg(long, value_name = "SEQ:HASH")]
        from_anchor: Option<hsm_audit::Head>,
    },
}

impl Cmd {
    /// True when the subcommand needs no connection.
    pub fn offline(&self) -> bool {
        matches!(self, Cmd::Verify { .. })
    }
}

fn read_err(path: &std::path::Path, source: std::io::Error) -> ClientError {
    ClientError::Read {
        path: path.to_owned(),
        source,
    }
}

fn output(out: &Option<PathBuf>, bytes: &[u8]) -> Result<(), ClientError> {
    match out {
        Some(p) => std::fs::write(p, bytes).map_err(|e| read_err(p, e)),
        None => std::io::stdout()
            .write_all(bytes)
            .map_err(|e| read_err(std::path::Path::new("-"), e)),
    }
}

/// Run an audit subcommand that needs the service.
pub async fn run(client: &HsmClient, cmd: &Cmd, json_out: bool) -> Result<ExitCode, ClientError> {
    let mut audit = client.audit();
    match cmd {
        Cmd::Export {
            from,
            out,
            checkpoint,
        } => {
            if *checkpoint {
                audit
                    .checkpoint_audit(pb::CheckpointAuditRequest {})
                    .await?;
            }
            let mut stream = audit
                .export_audit(pb::ExportAuditRequest { from_seq: *from })
                .await?
                .into_inner();
            let mut all = Vec::new();
            while let Some(chunk) = stream.message().await? {
                all.extend_from_slice(&chunk.jsonl);
            }
            output(out, &all)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keys { out } => {
            let keys = audit
                .get_audit_keys(pb::GetAuditKeysRequest {})
                .await?
                .into_inner()
                .keys;
            let map: serde_json::Map<String, serde_json::Value> = keys
                .into_iter()
                .map(|k| {
                    (
                        k.key_id,
                        json!(data_encoding::HEXLOWER.encode(&k.public_key)),
                    )
                })
                .collect();
            output(
                out,
                format!("{}\n", serde_json::Value::Object(map)).as_bytes(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint => {
            let r = audit
                .checkpoint_audit(pb::CheckpointAuditRequest {})
                .await?
                .into_inner();
            if json_out {
                println!("{}", json!({ "seq": r.seq, "head_seq": r.head_seq }));
            } else {
                println!(
                    "checkpoint at seq {} covers through seq {}",
                    r.seq, r.head_seq
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { .. } => verify(cmd, json_out),
    }
}

/// `hsmctl audit verify`, offline.
pub fn verify(cmd: &Cmd, json_out: bool) -> Result<ExitCode, ClientError> {
    let Cmd::Verify {
        file,
        keys,
        expect_key,
        from_anchor,
    } = cmd
    else {
        return Ok(ExitCode::FAILURE);
    };
    let trusted = match keys {
        Some(path) => read_keys(path, expect_key.as_ref())?,
        None => HashMap::new(),
    };
    let options = hsm_audit::VerifyOptions {
        anchor: from_anchor.clone(),
        pinned_key: expect_key.clone(),
        ..Default::default()
    };
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| read_err(file, e))?);
    let report = hsm_audit::verify_with(reader, &trusted, &options);
    if json_out {
        let problems: Vec<_> = report
            .problems
            .iter()
            .map(|p| json!({ "line": p.line, "seq": p.seq, "kind": format!("{:?}", p.kind), "message": p.message }))
            .collect();
        println!(
            "{}",
            json!({
                "ok": report.is_ok(),
                "records": report.records,
                "checkpoints": report.checkpoints,
                "uncovered_tail": report.uncovered_tail,
                "head": report.head.as_ref().map(|h| json!({ "seq": h.seq, "hash": h.hash })),
                "problems": problems,
            })
        );
    } else {
        print!("{report}");
        if !format!("{report}").ends_with('\n') {
            println!();
        }
        if let (true, Some(head)) = (report.is_ok(), &report.head) {
            // What an auditor keeps to verify the next segment against.
            println!(
                "  head {}:{} (--from-anchor for the next segment)",
                head.seq, head.hash
            );
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The keys file of `hsmctl audit keys`: key id -> hex public key. With a pin, the file
/// must not give the pinned id another key.
fn read_keys(
    path: &std::path::Path,
    pin: Option<&hsm_audit::KeyPin>,
) -> Result<HashMap<String, Vec<u8>>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    let bad_keys = |m: &str| {
        read_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned()),
        )
    };
    let parsed: HashMap<String, String> =
        serde_json::from_str(&text).map_err(|e| bad_keys(&e.to_string()))?;
    let mut trusted = HashMap::new();
    for (id, hex) in parsed {
        let key = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex.as_bytes())
            .map_err(|_| bad_keys("key values must be hex"))?;
        trusted.insert(id, key);
    }
    if let Some(pin) = pin {
        if trusted
            .get(&pin.key_id)
            .is_some_and(|k| *k != pin.public_key)
        {
            return Err(bad_keys(&format!(
                "the keys file gives {} another public key than --expect-key",
                pin.key_id
            )));
        }
    }
    Ok(trusted)
}
