//! Executing a ceremony: the checks before anything runs, the atomic claim, the steps
//! in order (see [`super::steps`]), and the final record and transcript files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use super::events::CeremonyEvent;
use super::plan::{self, Plan};
use super::record::{self, CeremonyRecord, CeremonyState, Change};
use super::steps::Run;
use super::{officer_of, parse_id, store_err, Ceremonies, Execution, Transcript};
use crate::auth::Identity;
use crate::error::{Error, Result};

/// A ceremony claimed for execution, with what its run needs.
struct Claimed {
    rec: CeremonyRecord,
    parsed: Plan,
    now: u64,
    json_path: PathBuf,
    text_path: PathBuf,
}

impl Ceremonies {
    /// [`Ceremonies::execute`] in a task of its own, so that nothing the caller does can
    /// cut a run half-way: a handler's future is dropped when its client disconnects,
    /// sends a short `grpc-timeout`, or its connection reaches the maximum age, and a run
    /// dropped between two steps would stay `executing` (keys made, outcome unrecorded)
    /// until the next start-up recovers it. The task runs to the recorded outcome; the
    /// caller gets the answer if it is still there.
    pub async fn execute_to_completion(
        self: &Arc<Self>,
        actor: &Identity,
        id: &str,
    ) -> Result<Execution> {
        let (this, actor, id) = (self.clone(), actor.clone(), id.to_owned());
        tokio::spawn(async move { this.execute(&actor, &id).await })
            .await
            .map_err(|e| Error::Internal(format!("ceremony execution task: {e}")))?
    }

    /// Execute ceremony `id`: only with `threshold` distinct officers' unexpired
    /// approvals, only once. Validation runs again first, before the HSM is touched.
    /// A failing step ends the ceremony (state `failed`); the transcript is written and
    /// returned either way. The claim, each step's end and the outcome are audited
    /// with (or before) the change they describe; a refusal (before the claim) and an
    /// error after it are recorded before they are returned.
    pub async fn execute(&self, actor: &Identity, id: &str) -> Result<Execution> {
        let checked = parse_id(id).and_then(|id| self.require_officer(actor).map(|_| id));
        let id = match checked {
            Ok(id) => id,
            Err(e) => return Err(self.refuse(actor, "ceremony.execute", id, e).await),
        };
        let _one = self.executing.lock().await;
        let claimed = match self.claim_checked(actor, &id).await {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(actor, "ceremony.execute", &id, e).await),
        };
        match self.run(actor, claimed).await {
            Ok(x) => Ok(x),
            Err(e) => Err(self.execution_error(actor, &id, e).await),
        }
    }

    /// The checks, then the claim. Runs under the execution lock.
    async fn claim_checked(&self, actor: &Identity, id: &str) -> Result<Claimed> {
        let rec = self.load(id).await?;
        let now = self.clock.now();
        let parsed = self.check_runnable(&rec, now).await?;
        let (json_path, text_path) = self.prepare_transcript_files(id)?;
        let rec = self.claim(actor, id, now, parsed.steps.len()).await?;
        Ok(Claimed {
            rec,
            parsed,
            now,
            json_path,
            text_path,
        })
    }

    /// Run a claimed ceremony's steps, then store and write its outcome.
    async fn run(&self, actor: &Identity, claimed: Claimed) -> Result<Execution> {
        let Claimed {
            mut rec,
            parsed,
            now,
            json_path,
            text_path,
        } = claimed;
        let id = rec.id.clone();
        let kek_shares = self.take_shares(&rec, now);
        let mut run = Run {
            actor,
            id: &id,
            kek_shares: &kek_shares,
            plan_keys: HashMap::new(),
            created: Vec::new(),
            t: Transcript::start(&rec, &parsed, now),
        };
        rec.failure = self.run_steps(&mut run, &parsed).await.unwrap_or_default();
        rec.state = if rec.failure.is_empty() {
            CeremonyState::Succeeded
        } else {
            CeremonyState::Failed
        };
        let Run { mut t, created, .. } = run;
        t.finish(&rec, self.clock.now());
        let transcript_json = t.to_json()?;
        let transcript_text = t.to_text();
        rec.transcript_json = transcript_json.clone();
        let outcome = self.note(
            actor,
            "ceremony.execute",
            &id,
            rec.state.as_str(),
            json!({ "failure": rec.failure }),
        );
        self.store_outcome(&rec, created, outcome).await?;
        write_new(&json_path, transcript_json.as_bytes())?;
        write_new(&text_path, transcript_text.as_bytes())?;
        Ok(Execution {
            view: self.view(rec)?,
            transcript: t,
            transcript_json,
            transcript_text,
        })
    }

    /// Record that the execution of claimed ceremony `id` ended in `err` (not a refusal:
    /// it ran; if its outcome could not be stored it stays `executing` and is marked
    /// interrupted at the next start) and hand `err` back.
    async fn execution_error(&self, actor: &Identity, id: &str, err: Error) -> Error {
        let event = self.note(
            actor,
            "ceremony.execute",
            id,
            "failed",
            json!({ "reason": err.to_string() }),
        );
        if let Err(e) = self.emit(event).await {
            tracing::error!(error = %e, "audit: cannot record a ceremony execution error");
        }
        err
    }

    /// Everything that must hold before a ceremony is claimed: still proposed, its
    /// quorum, its plan valid against the keys now, the shares its restores need.
    async fn check_runnable(&self, rec: &CeremonyRecord, now: u64) -> Result<Plan> {
        if rec.state != CeremonyState::Proposed {
            return Err(Error::FailedPrecondition(format!(
                "ceremony {} is {}; a ceremony runs once",
                rec.id,
                rec.state.as_str()
            )));
        }
        if let Some(p) = self.quorum.problem(rec, now) {
            return Err(Error::FailedPrecondition(p));
        }
        let parsed = plan::from_canonical(&rec.canonical_plan)?;
        plan::validate(&parsed, &self.context().await?)?;
        let sources = self.restore_sources(&parsed)?;
        if let Some(p) = self.shares_problem(rec, &sources, now) {
            return Err(Error::FailedPrecondition(p));
        }
        Ok(parsed)
    }

    /// The transcript file paths, checked not to exist, with their directory made.
    fn prepare_transcript_files(&self, id: &str) -> Result<(PathBuf, PathBuf)> {
        let (json_path, text_path) = self.transcript_paths(id);
        for p in [&json_path, &text_path] {
            if p.exists() {
                return Err(Error::FailedPrecondition(format!(
                    "transcript {} exists already; refusing to overwrite it",
                    p.display()
                )));
            }
        }
        std::fs::create_dir_all(&self.transcript_dir).map_err(|e| {
            Error::Internal(format!(
                "transcript directory {}: {e}",
                self.transcript_dir.display()
            ))
        })?;
        Ok((json_path, text_path))
    }

    /// Claim the ceremony atomically: state and quorum checked again in the write, the
    /// state set to `executing`, audited in the same write.
    async fn claim(
        &self,
        actor: &Identity,
        id: &str,
        now: u64,
        steps: usize,
    ) -> Result<CeremonyRecord> {
        let executor = officer_of(actor);
        let quorum = self.quorum.clone();
        let key = id.to_owned();
        let events = [self.note(
            actor,
            "ceremony.execute",
            id,
            "started",
            json!({ "steps": steps }),
        )];
        let (trail, audited) = (self.trail(), events.clone());
        let instance = self.instance();
        let claimed = self
            .store
            .write(move |txn| {
                let claimed = record::update(txn, &key, |current| match current {
                    Some(mut rec) if rec.state == CeremonyState::Proposed => {
                        if quorum.problem(&rec, now).is_some() {
                            return Change::Keep(None);
                        }
                        rec.state = CeremonyState::Executing;
                        rec.executed_by = Some(executor);
                        rec.executed_at = now;
                        rec.executed_on = instance;
                        Change::Write(Box::new(rec.clone()), Some(Box::new(rec)))
                    }
                    _ => Change::Keep(None),
                })?;
                if claimed.is_some() {
                    trail.append(txn, &audited)?;
                }
                Ok(claimed)
            })
            .await
            .map_err(store_err)?;
        if claimed.is_some() {
            self.emitted(&events);
        }
        claimed.map(|b| *b).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "ceremony {id} changed while it was being claimed; it was not executed"
            ))
        })
    }

    /// Run the steps in order until one fails; `Some(why)` names the failed step.
    async fn run_steps(&self, run: &mut Run<'_>, parsed: &Plan) -> Option<String> {
        for (i, step) in parsed.steps.iter().enumerate() {
            let index = run.t.begin_step(i, step);
            let done = match self.run_step(run, i, step).await {
                Ok(()) => {
                    let ok = self.note(
                        run.actor,
                        "ceremony.step",
                        run.id,
                        "ok",
                        json!({ "step": i + 1, "kind": step.kind(), "summary": step.summary() }),
                    );
                    self.emit(ok).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                run.t.end_step(index, Some(e.to_string()));
                let failed = self.note(
                    run.actor,
                    "ceremony.step",
                    run.id,
                    "failed",
                    json!({ "step": i + 1, "kind": step.kind(), "error": e.to_string() }),
                );
                if let Err(audit) = self.emit(failed).await {
                    tracing::error!(error = %audit, "audit: cannot record a failed ceremony step");
                }
                return Some(format!("step {} ({}) failed: {e}", i + 1, step.kind()));
            }
            run.t.end_step(index, None);
        }
        None
    }

    /// The final record, the index of the keys the ceremony created (each was recorded
    /// when it was made; again here, idempotently) and the outcome's audit record, in
    /// one write.
    async fn store_outcome(
        &self,
        rec: &CeremonyRecord,
        created: Vec<(String, u32)>,
        outcome: CeremonyEvent,
    ) -> Result<()> {
        let final_rec = rec.clone();
        let key = rec.id.clone();
        let events = [outcome];
        let (trail, audited) = (self.trail(), events.clone());
        self.store
            .write(move |txn| {
                record::put_key_origins(txn, &key, &created)?;
                record::update(txn, &key, |_| Change::Write(Box::new(final_rec), ()))?;
                trail.append(txn, &audited)
            })
            .await
            .map_err(store_err)?;
        self.emitted(&events);
        Ok(())
    }
}

/// Write a new file; never overwrite one.
pub(super) fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::Internal(format!("transcript {}: {e}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::Internal(format!("transcript {}: {e}", path.display())))
}
