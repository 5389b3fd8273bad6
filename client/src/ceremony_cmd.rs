//! `hsmctl ceremony ...`: propose a plan, approve and execute ceremonies, show and list
//! them (role officer; auditors may show and list).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use hsm_client::proto::{
    ApproveCeremonyRequest, CeremonyInfo, ExecuteCeremonyRequest, GetCeremonyRequest,
    ListCeremoniesRequest, ProposeCeremonyRequest,
};
use hsm_client::{ClientError, HsmClient};
use serde_json::{json, Value};

/// `hsmctl ceremony`.
#[derive(Subcommand)]
pub enum Cmd {
    /// Submit a plan file (TOML); prints the ceremony id that officers approve.
    Propose {
        /// The plan file.
        plan: PathBuf,
    },
    /// Approve a ceremony with your certificate.
    Approve {
        /// Ceremony id (64 hex digits).
        id: String,
        /// For a ceremony with a restore step: your backup KEK share file
        /// (`<label>.share-<i>`). Sent over the mutual-TLS connection and held in the
        /// service's memory only until the ceremony runs.
        #[arg(long, value_name = "FILE")]
        share: Option<PathBuf>,
    },
    /// Execute a ceremony that has enough approvals; prints the transcript.
    Execute {
        /// Ceremony id (64 hex digits).
        id: String,
        /// Also write the transcript here, as <DIR>/<id>.json and <DIR>/<id>.txt.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a ceremony: plan, approvals, state.
    Show {
        /// Ceremony id (64 hex digits).
        id: String,
    },
    /// List every ceremony.
    List,
}

fn info_json(c: &CeremonyInfo) -> Value {
    json!({
        "ceremony_id": c.ceremony_id,
        "state": c.state,
        "description": c.description,
        "steps": c.steps,
        "canonical_plan": c.canonical_plan,
        "proposed_by": c.proposed_by,
        "proposed_at": c.proposed_at,
        "approvals": c.approvals.iter().map(|a| json!({
            "subject": a.subject, "fingerprint": a.fingerprint,
            "approved_at": a.approved_at, "expires_at": a.expires_at,
        })).collect::<Vec<_>>(),
        "valid_approvals": c.valid_approvals,
        "threshold": c.threshold,
        "kek_shares_held": c.kek_shares_held,
        "executed_by": c.executed_by,
        "executed_at": c.executed_at,
        "failure": c.failure,
    })
}

fn print_info(c: &CeremonyInfo) {
    println!("ceremony {}", c.ceremony_id);
    println!("  state:       {}", c.state);
    println!("  description: {}", c.description);
    println!("  proposed by: {} at {}", c.proposed_by, c.proposed_at);
    println!(
        "  approvals:   {} valid of {} needed",
        c.valid_approvals, c.threshold
    );
    if c.kek_shares_held > 0 {
        println!("  KEK shares:  {} held for the restore", c.kek_shares_held);
    }
    for a in &c.approvals {
        println!(
            "    {} ({}) at {}, counts until {}",
            a.subject, a.fingerprint, a.approved_at, a.expires_at
        );
    }
    println!("  steps:");
    for (i, s) in c.steps.iter().enumerate() {
        println!("    {}. {s}", i + 1);
    }
    if !c.executed_by.is_empty() {
        println!("  executed by: {} at {}", c.executed_by, c.executed_at);
    }
    if !c.failure.is_empty() {
        println!("  failure:     {}", c.failure);
    }
}

fn write_out(path: PathBuf, text: &str) -> Result<(), ClientError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(|source| ClientError::Read { path, source })
}

/// Run `hsmctl ceremony ...`. `execute` exits 1 when a step failed.
pub async fn run(client: &HsmClient, cmd: &Cmd, as_json: bool) -> Result<ExitCode, ClientError> {
    let mut svc = client.ceremonies();
    match cmd {
        Cmd::Propose { plan } => {
            let plan_toml = std::fs::read_to_string(plan).map_err(|source| ClientError::Read {
                path: plan.clone(),
                source,
            })?;
            let c = svc
                .propose_ceremony(ProposeCeremonyRequest { plan_toml })
                .await?
                .into_inner();
            if as_json {
                println!("{}", info_json(&c));
            } else {
                print_info(&c);
                println!(
                    "\nofficers approve with: hsmctl ceremony approve {}",
                    c.ceremony_id
                );
            }
        }
        Cmd::Approve { id, share } => {
            // The share file's text is secret. It moves into the request without a copy;
            // tonic encodes the request into its own buffer and drops it (not ours to
            // zeroize), and hsmctl exits right after.
            let kek_share = match share {
                None => String::new(),
                Some(path) => {
                    std::fs::read_to_string(path).map_err(|source| ClientError::Read {
                        path: path.clone(),
                        source,
                    })?
                }
            };
            let c = svc
                .approve_ceremony(ApproveCeremonyRequest {
                    ceremony_id: id.clone(),
                    kek_share,
                })
                .await?
                .into_inner();
            if as_json {
                println!("{}", info_json(&c));
            } else {
                print_info(&c);
            }
        }
        Cmd::Execute { id, out } => {
            let r = svc
                .execute_ceremony(ExecuteCeremonyRequest {
                    ceremony_id: id.clone(),
                })
                .await?
                .into_inner();
            let c = r.ceremony.unwrap_or_default();
            if let Some(dir) = out {
                write_out(
                    dir.join(format!("{}.json", c.ceremony_id)),
                    &r.transcript_json,
                )?;
                write_out(
                    dir.join(format!("{}.txt", c.ceremony_id)),
                    &r.transcript_text,
                )?;
            }
            if as_json {
                let transcript: Value =
                    serde_json::from_str(&r.transcript_json).unwrap_or(Value::Null);
                println!(
                    "{}",
                    json!({ "ceremony": info_json(&c), "transcript": transcript })
                );
            } else {
                print!("{}", r.transcript_text);
            }
            if c.state != "succeeded" {
                if !as_json {
                    eprintln!("hsmctl: ceremony {}: {}", c.ceremony_id, c.failure);
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Show { id } => {
            let c = svc
                .get_ceremony(GetCeremonyRequest {
                    ceremony_id: id.clone(),
                })
                .await?
                .into_inner();
            if as_json {
                println!("{}", info_json(&c));
            } else {
                print_info(&c);
            }
        }
        Cmd::List => {
            let list = svc
                .list_ceremonies(ListCeremoniesRequest {})
                .await?
                .into_inner()
                .ceremonies;
            if as_json {
                let v: Vec<Value> = list.iter().map(info_json).collect();
                println!("{}", json!({ "ceremonies": v }));
            } else {
                for c in list {
                    println!(
                        "{}  {:<9} {}/{} approvals  {}",
                        c.ceremony_id, c.state, c.valid_approvals, c.threshold, c.description
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
