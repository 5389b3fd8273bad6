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
    /// Stream the records as JSON Lines (to stdout or --out): every chain (one per
    /// service instance), each after a header line `{"audit_chain":"NAME"}`; the records
    /// of chain `default` first without one, so a single-instance export is the plain
    /// record stream.
    Export {
        /// First sequence number (of each chain).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Only this chain (an instance's name; `default` in the embedded store).
        #[arg(long, value_parser = chain_name)]
        chain: Option<String>,
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
    /// Sign a checkpoint over the current head now (of the answering instance's chain).
    Checkpoint,
    /// Every audit chain (one per service instance): records, head, last checkpoint.
    Chains,
    /// Check an export offline, every chain on its own: hash links, sequence from 1,
    /// checkpoint signatures. Reports per chain (records, head, last checkpoint, gaps,
    /// records after the last checkpoint); exits 0 only when every chain is intact; says
    /// exactly where a record was altered, removed or reordered, and in which chain.
    Verify {
        /// The exported JSON Lines file.
        file: PathBuf,
        /// Verify only this chain.
        #[arg(long, value_parser = chain_name)]
        chain: Option<String>,
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
        /// It belongs to one chain: with several chains in the file, name it (--chain).
        #[arg(long, value_name = "SEQ:HASH")]
        from_anchor: Option<hsm_audit::Head>,
    },
}

fn chain_name(s: &str) -> Result<String, String> {
    hsm_audit::check_chain_name(s).map(|()| s.to_owned())
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
            chain,
            out,
            checkpoint,
        } => {
            if *checkpoint {
                audit
                    .checkpoint_audit(pb::CheckpointAuditRequest {})
                    .await?;
            }
            let mut stream = audit
                .export_audit(pb::ExportAuditRequest {
                    from_seq: *from,
                    chain: chain.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut all = Vec::new();
            // Records before the first header are chain `default` (the format of one chain).
            let mut current = hsm_audit::DEFAULT_CHAIN.to_owned();
            let mut first = true;
            while let Some(chunk) = stream.message().await? {
                // A service from before chains names none: its one chain is `default`.
                let name = match chunk.chain.as_str() {
                    "" => hsm_audit::DEFAULT_CHAIN,
                    n => n,
                };
                if name != current || (first && name != hsm_audit::DEFAULT_CHAIN) {
                    all.extend_from_slice(hsm_audit::chain_header(name).as_bytes());
                    all.push(b'\n');
                    current = name.to_owned();
                }
                first = false;
                all.extend_from_slice(&chunk.jsonl);
            }
            output(out, &all)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Chains => {
            let r = audit
                .list_audit_chains(pb::ListAuditChainsRequest {})
                .await?
                .into_inner();
            if json_out {
                let chains: Vec<_> = r
                    .chains
                    .iter()
                    .map(|c| {
                        json!({
                            "chain": c.chain,
                            "records": c.records,
                            "head": { "seq": c.head_seq, "hash": c.head_hash },
                            "last_checkpoint": (c.last_checkpoint_seq > 0).then(|| json!({
                                "seq": c.last_checkpoint_seq,
                                "head_seq": c.last_checkpoint_head_seq,
                            })),
                            "after_last_checkpoint": c.head_seq.saturating_sub(c.last_checkpoint_head_seq),
                        })
                    })
                    .collect();
                println!("{}", json!({ "own_chain": r.own_chain, "chains": chains }));
            } else {
                for c in &r.chains {
                    let own = if c.chain == r.own_chain {
                        " (this instance)"
                    } else {
                        ""
                    };
                    let last = if c.last_checkpoint_seq > 0 {
                        format!(
                            "last checkpoint seq {} covers through seq {}",
                            c.last_checkpoint_seq, c.last_checkpoint_head_seq
                        )
                    } else {
                        "no checkpoint yet".to_owned()
                    };
                    println!(
                        "{}{own}: {} records, head {}:{}, {last}",
                        c.chain, c.records, c.head_seq, c.head_hash
                    );
                }
            }
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

/// `hsmctl audit verify`, offline: every chain of the file (or `--chain`), each with the
/// verifier of `hsm-audit`.
pub fn verify(cmd: &Cmd, json_out: bool) -> Result<ExitCode, ClientError> {
    let Cmd::Verify {
        file,
        chain,
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
    let options = hsm_audit::ChainsOptions {
        only: chain.clone(),
        anchor: from_anchor.clone(),
        pinned_key: expect_key.clone(),
    };
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| read_err(file, e))?);
    let report = hsm_audit::verify_chains(reader, &trusted, &options);
    if json_out {
        println!("{}", report_json(&report));
    } else {
        print!("{report}");
        for c in &report.chains {
            if let (true, Some(head)) = (c.report.is_ok(), &c.report.head) {
                // What an auditor keeps to verify the next segment against.
                println!(
                    "  chain {} head {}:{} (--chain {} --from-anchor for its next segment)",
                    c.chain, head.seq, head.hash, c.chain
                );
            }
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The report as JSON: per chain, and the totals at the top level (as before chains:
/// `records`, `checkpoints`, `uncovered_tail`, `problems`, and `head` when the file holds
/// one chain).
fn report_json(report: &hsm_audit::ChainsReport) -> serde_json::Value {
    let problem = |chain: Option<&str>, p: &hsm_audit::Problem| json!({ "chain": chain, "line": p.line, "seq": p.seq, "kind": format!("{:?}", p.kind), "message": p.message });
    let head =
        |h: &Option<hsm_audit::Head>| h.as_ref().map(|h| json!({ "seq": h.seq, "hash": h.hash }));
    let chains: Vec<_> = report
        .chains
        .iter()
        .map(|c| {
            let r = &c.report;
            json!({
                "chain": c.chain,
                "ok": r.is_ok(),
                "records": r.records,
                "checkpoints": r.checkpoints,
                "head": head(&r.head),
                "last_checkpoint": r.last_checkpoint,
                "covered_through": r.covered_through,
                "uncovered_tail": r.uncovered_tail,
                "gaps": c.gaps().map(|p| p.message.clone()).collect::<Vec<_>>(),
                "problems": r.problems.iter().map(|p| problem(Some(&c.chain), p)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let problems: Vec<_> = report.all_problems().map(|(c, p)| problem(c, p)).collect();
    json!({
        "ok": report.is_ok(),
        "records": report.records(),
        "checkpoints": report.chains.iter().map(|c| c.report.checkpoints).sum::<u64>(),
        "uncovered_tail": report.chains.iter().map(|c| c.report.uncovered_tail).sum::<u64>(),
        "head": match report.chains.as_slice() {
            [one] => head(&one.report.head),
            _ => None,
        },
        "problems": problems,
        "chains": chains,
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
