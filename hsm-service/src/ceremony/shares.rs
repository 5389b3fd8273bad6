//! M-of-N shares of a backup KEK: Shamir's secret sharing over GF(256) (the `blahaj`
//! crate, a maintained fork of `sharks`). Each share is one byte of x-coordinate followed
//! by one byte per secret byte; a share alone, or M-1 of them, says nothing about the KEK.
//! Recombining fewer than M shares is refused; M shares of different backups recombine
//! into a wrong KEK, which the AES key wrap's integrity check then refuses.

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Most shares (one x-coordinate byte, 0 excluded).
pub const MAX_SHARES: u8 = 255;

/// Check M-of-N: 2 <= M <= N <= [`MAX_SHARES`].
pub fn check_quorum(threshold: u32, shares: u32) -> Result<()> {
    if threshold < 2 || threshold > shares || shares > u32::from(MAX_SHARES) {
        return Err(Error::InvalidArgument(format!(
            "threshold {threshold} of {shares} shares: need 2 <= threshold <= shares <= {MAX_SHARES}"
        )));
    }
    Ok(())
}

/// Split `secret` into `shares` shares, any `threshold` of which recombine it.
pub fn split(secret: &[u8], threshold: u8, shares: u8) -> Result<Vec<Zeroizing<Vec<u8>>>> {
    check_quorum(u32::from(threshold), u32::from(shares))?;
    if secret.is_empty() {
        return Err(Error::InvalidArgument("nothing to split".into()));
    }
    Ok(blahaj::Sharks(threshold)
        .dealer(secret)
        .take(usize::from(shares))
        .map(|s| Zeroizing::new(Vec::from(&s)))
        .collect())
}

/// Recombine the secret from at least `threshold` distinct shares.
pub fn combine(threshold: u8, shares: &[Zeroizing<Vec<u8>>]) -> Result<Zeroizing<Vec<u8>>> {
    if threshold < 2 {
        return Err(Error::InvalidArgument(
            "a split KEK has a threshold of at least 2".into(),
        ));
    }
    let parsed = shares
        .iter()
        .map(|s| {
            blahaj::Share::try_from(s.as_slice())
                .map_err(|e| Error::InvalidArgument(format!("malformed share: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    blahaj::Sharks(threshold)
        .recover(&parsed)
        .map(Zeroizing::new)
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "{} share(s) given, {threshold} distinct ones needed: {e}",
                shares.len()
            ))
        })
}

/// First word of a share file's header line.
pub const SHARE_FILE_MAGIC: &str = "hsm-backup-kek-share-v1";

/// Check value of a KEK: the first 8 bytes of SHA-256 over a domain tag and the KEK, in
/// hex. It names a KEK (shares of one KEK carry the same) without revealing it.
pub fn kek_check_value(kek: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"hsm-backup-kek-check-v1\0");
    ctx.update(kek);
    let d = ctx.finish();
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Check a KEK label as used in share file names and headers.
pub fn check_kek_label(label: &str) -> Result<()> {
    let ok = !label.is_empty()
        && label.len() <= 64
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !label.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "KEK label {label:?}: 1 to 64 of A-Z a-z 0-9 - _ . and not starting with a dot"
        )))
    }
}

/// One officer's share of a backup KEK, as held in a share file. `Debug` leaves the
/// share bytes out; the bytes are zeroized on drop.
#[derive(Clone)]
pub struct ShareFile {
    /// Label of the KEK.
    pub label: String,
    /// Shares needed to recombine the KEK.
    pub threshold: u8,
    /// Number of the share (1..=N), as in the file name.
    pub index: u8,
    /// [`kek_check_value`] of the KEK.
    pub check: String,
    /// The share (x-coordinate byte, then one byte per KEK byte).
    pub share: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFile")
            .field("label", &self.label)
            .field("threshold", &self.threshold)
            .field("index", &self.index)
            .field("check", &self.check)
            .field("share", &"[redacted]")
            .finish()
    }
}

impl ShareFile {
    /// The file's text: a header line, then the share in standard base64.
    pub fn encode(&self) -> Zeroizing<String> {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        Zeroizing::new(format!(
            "{SHARE_FILE_MAGIC} label={} threshold={} index={} check={}\n{}\n",
            self.label,
            self.threshold,
            self.index,
            self.check,
            Zeroizing::new(STANDARD.encode(self.share.as_slice())).as_str()
        ))
    }

    /// Parse a share file's text. Errors never quote the share line.
    pub fn parse(text: &str) -> Result<ShareFile> {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        let bad = |what: &str| Error::InvalidArgument(format!("malformed share file: {what}"));
        let mut lines = text.lines();
        let header = lines.next().ok_or_else(|| bad("empty"))?;
        let body = lines.next().ok_or_else(|| bad("no share line"))?.trim();
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("more than two lines"));
        }
        let mut words = header.split(' ');
        if words.next() != Some(SHARE_FILE_MAGIC) {
            return Err(bad(&format!("first word is not {SHARE_FILE_MAGIC}")));
        }
        let (mut label, mut threshold, mut index, mut check) = (None, None, None, None);
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| bad("header field without ="))?;
            let slot = match k {
                "label" => &mut label,
                "threshold" => &mut threshold,
                "index" => &mut index,
                "check" => &mut check,
                _ => return Err(bad(&format!("unknown header field {k:?}"))),
            };
            if slot.replace(v.to_owned()).is_some() {
                return Err(bad(&format!("header field {k:?} twice")));
            }
        }
        let label = label.ok_or_else(|| bad("no label"))?;
        check_kek_label(&label)?;
        let number = |v: Option<String>, what: &str| -> Result<u8> {
            v.ok_or_else(|| bad(&format!("no {what}")))?
                .parse::<u8>()
                .map_err(|_| bad(&format!("{what} is not a number from 0 to 255")))
        };
        let threshold = number(threshold, "threshold")?;
        let index = number(index, "index")?;
        if threshold < 2 || index == 0 {
            return Err(bad("threshold below 2 or index 0"));
        }
        let check = check.ok_or_else(|| bad("no check"))?;
        if check.len() != 16 || !check.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("check is not 16 hex digits"));
        }
        let share = Zeroizing::new(
            STANDARD
                .decode(body)
                .map_err(|_| bad("share line is not base64"))?,
        );
        if share.len() != super::super::hsm::backup::KEK_LEN + 1 {
            return Err(bad("share has the wrong length"));
        }
        Ok(ShareFile {
            label,
            threshold,
            index,
            check,
            share,
        })
    }
}

/// Split `kek` into `shares` share files of KEK `label`, any `threshold` of which
/// recombine it. Indices run from 1.
pub fn split_kek(label: &str, kek: &[u8], threshold: u8, shares: u8) -> Result<Vec<ShareFile>> {
    check_kek_label(label)?;
    let check = kek_check_value(kek);
    Ok(split(kek, threshold, shares)?
        .into_iter()
        .zip(1u8..)
        .map(|(share, index)| ShareFile {
            label: label.to_owned(),
            threshold,
            index,
            check: check.clone(),
            share,
        })
        .collect())
}

/// Path of share `index` of KEK `label` in `dir`.
pub fn share_path(dir: &std::path::Path, label: &str, index: u8) -> std::path::PathBuf {
    dir.join(format!("{label}.share-{index}"))
}

/// Write each share to its own file `dir/<label>.share-<i>`, mode 0600, created new: if
/// any of them exists, nothing is written.
pub fn write_share_files(
    dir: &std::path::Path,
    files: &[ShareFile],
) -> Result<Vec<std::path::PathBuf>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let paths: Vec<_> = files
        .iter()
        .map(|f| share_path(dir, &f.label, f.index))
        .collect();
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(Error::FailedPrecondition(format!(
            "{} exists: share files are never overwritten",
            p.display()
        )));
    }
    for (f, p) in files.iter().zip(&paths) {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .map_err(|e| Error::Internal(format!("create {}: {e}", p.display())))?;
        out.write_all(f.encode().as_bytes())
            .and_then(|()| out.sync_all())
            .map_err(|e| Error::Internal(format!("write {}: {e}", p.display())))?;
    }
    Ok(paths)
}

/// Recombine KEK `label` from share files: they must all be of that KEK (same label,
/// threshold and check value), distinct, and at least `threshold` of them; the result
/// must have the check value they name.
pub fn combine_share_files(label: &str, files: &[ShareFile]) -> Result<Zeroizing<Vec<u8>>> {
    let first = files.first().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "0 shares given of KEK {label:?}, at least 2 needed"
        ))
    })?;
    if let Some(f) = files
        .iter()
        .find(|f| f.label != label || f.check != first.check || f.threshold != first.threshold)
    {
        return Err(Error::InvalidArgument(format!(
            "share {} is of KEK {:?} (check {}, threshold {}), not of the same KEK as the \
             others ({label:?}, check {}, threshold {})",
            f.index, f.label, f.check, f.threshold, first.check, first.threshold
        )));
    }
    let mut indices: Vec<u8> = files.iter().map(|f| f.index).collect();
    indices.sort_unstable();
    indices.dedup();
    let m = first.threshold;
    if indices.len() < usize::from(m) {
        return Err(Error::FailedPrecondition(format!(
            "{} distinct share(s) of KEK {label:?} given, {m} needed",
            indices.len()
        )));
    }
    let shares: Vec<_> = files.iter().map(|f| f.share.clone()).collect();
    let kek = combine(m, &shares)?;
    if kek_check_value(&kek) != first.check {
        return Err(Error::InvalidArgument(format!(
            "the shares of KEK {label:?} do not recombine to the KEK with check value {} \
             (a share is damaged or of another split)",
            first.check
        )));
    }
    Ok(kek)
}

/// Store meta key prefix of the [`KekRecord`]s: `backup_kek/<label>`.
pub const KEK_META_PREFIX: &str = "backup_kek/";

/// What the service knows of a trusted backup KEK provisioned on its token (never its
/// value): written by `hsm-service backup-kek` into the store, read by plan validation
/// (a `backup` step names a provisioned KEK) and by the `backup` step (the file names
/// the KEK's check value, which restores compare with the shares').
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekRecord {
    /// Token label of the KEK.
    pub label: String,
    /// [`kek_check_value`] of the KEK.
    pub check: String,
    /// Shares needed to recombine it (M).
    pub threshold: u8,
    /// Shares made (N).
    pub shares: u8,
    /// Unix seconds of provisioning.
    pub created_at: u64,
}

/// Every KEK record in the store, by label.
pub async fn load_keks(
    store: &crate::store::Store,
) -> Result<std::collections::BTreeMap<String, KekRecord>> {
    let corrupt = |e: String| Error::Internal(format!("backup KEK records: {e}"));
    store
        .read(|txn| Ok(crate::store::ops::meta_with_prefix(txn, KEK_META_PREFIX)?))
        .await
        .map_err(|e| corrupt(e.to_string()))?
        .into_iter()
        .map(|(_, v)| {
            serde_json::from_slice::<KekRecord>(&v)
                .map(|r| (r.label.clone(), r))
                .map_err(|e| corrupt(e.to_string()))
        })
        .collect()
}

/// Store `rec` and its audit record (action `backup-kek.create`, actor `actor`, on the
/// audit chain `chain`) in one durable commit. Refuses a label that has a record already.
pub async fn record_kek(
    store: &crate::store::Store,
    chain: &crate::store::ChainName,
    rec: KekRecord,
    actor: crate::audit::Actor,
) -> Result<()> {
    use crate::audit::{Details, Event};
    let key = format!("{KEK_META_PREFIX}{}", rec.label);
    let value = serde_json::to_vec(&rec).map_err(|e| Error::Internal(e.to_string()))?;
    let event = Event::new(
        crate::common::Clock::system().now_ms(),
        actor,
        "backup-kek.create",
        &rec.label,
    )
    .with_details(
        Details::new()
            .str("check", &rec.check)
            .u64("threshold", u64::from(rec.threshold))
            .u64("shares", u64::from(rec.shares)),
    );
    let chain = chain.to_owned();
    let stored = store
        .write(move |txn| {
            if crate::store::ops::get_meta(txn, &key)?.is_some() {
                return Ok(false);
            }
            if let Err(e) = crate::store::ops::put_meta(txn, &key, &value)? {
                return Err(crate::store::Rollback(e));
            }
            crate::audit::log::append_in(txn, &chain, event)?;
            Ok(true)
        })
        .await
        .map_err(|e| Error::Internal(format!("backup KEK record: {e}")))?;
    if stored {
        Ok(())
    } else {
        Err(Error::AlreadyExists(format!(
            "the store has a record of KEK {:?} already",
            rec.label
        )))
    }
}

/// Offline provisioning of backup KEK `label` (service stopped): the KEK is drawn from
/// the token's RNG and created trusted by the security officer, split M-of-N, and share
/// `i` written to `dir/<label>.share-<i>` (mode 0600). Refuses, before touching the token,
/// a bad label or quorum, a missing `dir` or an existing share file; refuses an existing
/// KEK label. The KEK's value is zeroized on return. Returns the share files' paths and
/// the KEK's check value.
pub fn provision_backup_kek(
    settings: &crate::hsm::HsmSettings,
    so_pin: &secrecy::SecretString,
    label: &str,
    threshold: u8,
    shares: u8,
    dir: &std::path::Path,
) -> Result<(Vec<std::path::PathBuf>, String)> {
    check_kek_label(label)?;
    check_quorum(u32::from(threshold), u32::from(shares))?;
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if let Some(p) = (1..=shares)
        .map(|i| share_path(dir, label, i))
        .find(|p| p.exists())
    {
        return Err(Error::FailedPrecondition(format!(
            "{} exists: share files are never overwritten",
            p.display()
        )));
    }
    let kek = crate::hsm::backup::create_random_trusted_kek(settings, so_pin, label).map_err(
        |e| match e {
            crate::hsm::Error::Invalid(m) => Error::FailedPrecondition(m),
            e => e.into(),
        },
    )?;
    let files = split_kek(label, &kek, threshold, shares)?;
    let check = kek_check_value(&kek);
    drop(kek);
    Ok((write_share_files(dir, &files)?, check))
}

/// `hsm-service backup-kek`, everything but the command line and opening the store:
/// with the service of `config` stopped (the caller opened its `store`, which the
/// embedded engine locks while the service runs, so a running service is refused before
/// the token is touched), provision KEK `label` M-of-N with the share files in `dir`
/// ([`provision_backup_kek`]), and record it ([`record_kek`]) with its audit record on
/// the chain [`crate::store::DEFAULT_CHAIN`], so that plans can name it. Closes `store`.
/// Returns the share files' paths and the KEK's check value.
pub async fn backup_kek_offline(
    config: &crate::config::Config,
    store: crate::store::Store,
    so_pin: &secrecy::SecretString,
    label: &str,
    threshold: u8,
    shares: u8,
    dir: &std::path::Path,
) -> Result<(Vec<std::path::PathBuf>, String)> {
    let settings = crate::hsm::HsmSettings {
        module: config.hsm.module.clone(),
        token: config.token(),
        sessions: 1,
        queue_capacity: 1,
        seed_cache_capacity: 1,
    };
    let (paths, check) = provision_backup_kek(&settings, so_pin, label, threshold, shares, dir)?;
    let record = KekRecord {
        label: label.to_owned(),
        check: check.clone(),
        threshold,
        shares,
        created_at: crate::common::Clock::system().now(),
    };
    record_kek(
        &store,
        crate::store::DEFAULT_CHAIN,
        record,
        crate::audit::Actor::new("security-officer (offline backup-kek)", ""),
    )
    .await
    .map_err(|e| {
        Error::Internal(format!(
            "the KEK and its share files were made, but recording it in the store failed: {e}"
        ))
    })?;
    store
        .close()
        .map_err(|e| Error::Internal(format!("closing the store: {e}")))?;
    Ok((paths, check))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn m_of_n_recombines_and_fewer_do_not() {
        let secret = [0x5au8; 32];
        let shares = split(&secret, 3, 5).expect("split");
        assert_eq!(shares.len(), 5);
        assert!(shares.iter().all(|s| s.len() == 33));
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let some: Vec<_> = pick.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(&combine(3, &some).expect("combine")[..], &secret[..]);
        }
        let two = vec![shares[0].clone(), shares[1].clone()];
        let e = combine(3, &two).expect_err("2 of 3");
        assert!(e.to_string().contains("3 distinct ones needed"), "{e}");
        // The same share twice counts once.
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert!(combine(3, &dup).is_err());
        for (m, n) in [(1, 3), (4, 3), (0, 0), (2, 256)] {
            assert!(check_quorum(m, n).is_err(), "{m} of {n}");
        }
        assert!(split(&secret, 1, 3).is_err());
        assert!(combine(3, &[Zeroizing::new(vec![1])]).is_err());
    }

    #[test]
    fn share_files_round_trip_and_refuse_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kek = [0x42u8; 32];
        let files = split_kek("backup-kek-1", &kek, 2, 3).expect("split");
        let paths = write_share_files(dir.path(), &files).expect("write");
        assert_eq!(paths[2], dir.path().join("backup-kek-1.share-3"));
        use std::os::unix::fs::PermissionsExt as _;
        for p in &paths {
            let mode = std::fs::metadata(p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        let e = write_share_files(dir.path(), &files).expect_err("overwrite");
        assert!(e.to_string().contains("never overwritten"), "{e}");
        let read: Vec<_> = paths
            .iter()
            .map(|p| ShareFile::parse(&std::fs::read_to_string(p).unwrap()).expect("parse"))
            .collect();
        let text = std::fs::read_to_string(&paths[0]).unwrap();
        assert!(text.starts_with(&format!(
            "{SHARE_FILE_MAGIC} label=backup-kek-1 threshold=2 index=1 check={}\n",
            kek_check_value(&kek)
        )));
        let debug = format!("{:?}", read[0]);
        let body = text.lines().nth(1).unwrap();
        assert!(
            !debug.contains(body) && debug.contains("redacted"),
            "{debug}"
        );
        // Any 2 of 3 recombine.
        for pick in [[0usize, 1], [2, 0], [1, 2]] {
            let some: Vec<_> = pick
                .iter()
                .map(|&i| ShareFile::parse(&read[i].encode()).unwrap())
                .collect();
            assert_eq!(
                &combine_share_files("backup-kek-1", &some).unwrap()[..],
                &kek
            );
        }
        // One share, or one twice, is too few.
        let one = vec![ShareFile::parse(&read[0].encode()).unwrap()];
        let e = combine_share_files("backup-kek-1", &one).expect_err("1 of 2");
        assert!(e.to_string().contains("1 distinct share(s)"), "{e}");
        assert!(e.to_string().contains("2 needed"), "{e}");
        let twice: Vec<_> = [0, 0]
            .iter()
            .map(|&i: &usize| ShareFile::parse(&read[i].encode()).unwrap())
            .collect();
        assert!(combine_share_files("backup-kek-1", &twice).is_err());
        assert!(combine_share_files("backup-kek-1", &[]).is_err());
        // Shares of another KEK, or of another split of the same label, are refused.
        let other = split_kek("backup-kek-1", &[7u8; 32], 2, 3).unwrap();
        let mixed = vec![
            ShareFile::parse(&read[0].encode()).unwrap(),
            other.into_iter().nth(1).unwrap(),
        ];
        let e = combine_share_files("backup-kek-1", &mixed).expect_err("mixed");
        assert!(e.to_string().contains("not of the same KEK"), "{e}");
        let resplit = split_kek("backup-kek-1", &kek, 2, 3).unwrap();
        let mixed = vec![
            ShareFile::parse(&read[0].encode()).unwrap(),
            resplit.into_iter().nth(1).unwrap(),
        ];
        let e = combine_share_files("backup-kek-1", &mixed).expect_err("resplit");
        assert!(e.to_string().contains("do not recombine"), "{e}");
        let e = combine_share_files("backup-kek-2", &read).expect_err("label");
        assert!(e.to_string().contains("not of the same KEK"), "{e}");
        // Malformed files.
        let good = read[0].encode();
        let (header, body) = good.split_once('\n').unwrap();
        for (text, want) in [
            (String::new(), "empty"),
            (header.to_owned(), "no share line"),
            (good.replace(SHARE_FILE_MAGIC, "other"), "first word"),
            (
                good.replace("threshold=2", "threshold=1"),
                "threshold below 2",
            ),
            (good.replace("index=1", "index=x"), "index is not a number"),
            (
                good.replace("label=backup-kek-1", "label=../x"),
                "KEK label",
            ),
            (
                good.replace(" check=", " extra=1 check="),
                "unknown header field",
            ),
            (format!("{header}\n!!!\n"), "not base64"),
            (format!("{header}\nAAAA\n"), "wrong length"),
            (format!("{header}\n{body}\nmore\n"), "more than two lines"),
        ] {
            let e = ShareFile::parse(&text).expect_err(want);
            assert!(e.to_string().contains(want), "{want}: {e}");
            assert!(!e.to_string().contains(body), "{e}");
        }
    }
}
