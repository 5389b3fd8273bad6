//! A relay's resume cursor: a file holding the seq of the last event it handled.
//!
//! The file holds one decimal number and a newline. [`CursorFile::store`] replaces it
//! atomically and durably (write a temporary file beside it, fsync it, rename it over
//! the cursor, fsync the directory), so after a crash at any moment the file holds
//! either the previous seq or the new one, never a torn or empty value. A file that does
//! not parse is refused with an error, never read as "start from 0": a relay that
//! silently restarted from the oldest event would notify every citizen again.
//!
//! [`CursorFile::open`] also takes an exclusive advisory lock (on `<file>.lock`), so two
//! relays cannot share one cursor by mistake.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the cursor cannot be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CursorError {
    /// The file exists but does not hold a seq.
    #[error(
        "cursor file {path} is corrupt ({detail}): refusing to guess where to resume; \
         fix it (it holds the last handled seq as a decimal number) or delete it"
    )]
    Corrupt {
        /// The cursor file.
        path: PathBuf,
        /// What is wrong with its content.
        detail: String,
    },
    /// Another process holds the lock.
    #[error("cursor file {path} is in use by another relay (lock {lock} is held)")]
    Locked {
        /// The cursor file.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// Reading, writing, syncing or renaming failed.
    #[error("cursor file {path}: cannot {action}: {source}")]
    Io {
        /// The file acted on.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}

/// An open, locked cursor file.
#[derive(Debug)]
pub struct CursorFile {
    path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
    /// Held for the life of the cursor; the lock goes with it.
    _lock: File,
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

impl CursorFile {
    /// Lock `path` for this process and read it: `None` when the file does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<(CursorFile, Option<u64>), CursorError> {
        let path = path.as_ref().to_owned();
        let io = |action, p: &Path| {
            let p = p.to_owned();
            move |source| CursorError::Io {
                path: p,
                action,
                source,
            }
        };
        if path.file_name().is_none() {
            return Err(CursorError::Io {
                path,
                action: "use it",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            });
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let lock_path = sibling(&path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("create its lock file", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(CursorError::Locked {
                    path,
                    lock: lock_path,
                })
            }
            Err(e) => return Err(io("lock it", &lock_path)(e.into())),
        }
        let seq = load(&path)?;
        let tmp = sibling(&path, ".tmp");
        Ok((
            CursorFile {
                path,
                tmp,
                dir,
                _lock: lock,
            },
            seq,
        ))
    }

    /// The cursor file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `seq` as the last handled event, atomically and durably.
    pub fn store(&self, seq: u64) -> Result<(), CursorError> {
        let io = |action, p: &Path| {
            let p = p.to_owned();
            move |source| CursorError::Io {
                path: p,
                action,
                source,
            }
        };
        let mut f = File::create(&self.tmp).map_err(io("create", &self.tmp))?;
        f.write_all(format!("{seq}\n").as_bytes())
            .map_err(io("write", &self.tmp))?;
        f.sync_all().map_err(io("fsync", &self.tmp))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io("rename over", &self.path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync the directory of", &self.path))?;
        Ok(())
    }
}

/// Read a cursor file without locking it: `None` when it does not exist.
pub fn load(path: impl AsRef<Path>) -> Result<Option<u64>, CursorError> {
    let path = path.as_ref();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CursorError::Io {
                path: path.to_owned(),
                action: "read",
                source,
            })
        }
    };
    let corrupt = |detail: String| CursorError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not text".into()))?;
    let digits = text.strip_suffix('\n').unwrap_or(text);
    if digits.is_empty() {
        return Err(corrupt("empty".into()));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(corrupt(format!(
            "{} bytes that are not a decimal number",
            bytes.len()
        )));
    }
    digits
        .parse()
        .map(Some)
        .map_err(|e| corrupt(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn missing_file_is_none_and_store_then_load_round_trips() {
        let d = dir();
        let p = d.path().join("cursor");
        let (c, seq) = CursorFile::open(&p).expect("open");
        assert_eq!(seq, None);
        c.store(41).expect("store");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "41\n");
        c.store(42).expect("store");
        assert_eq!(load(&p).expect("load"), Some(42));
        assert!(
            !sibling(&p, ".tmp").exists(),
            "the temporary file is renamed"
        );
        drop(c);
        let (_c, seq) = CursorFile::open(&p).expect("reopen");
        assert_eq!(seq, Some(42));
    }

    #[test]
    fn corrupt_files_are_refused_never_read_as_zero() {
        let d = dir();
        let p = d.path().join("cursor");
        for bad in [
            &b""[..],
            b"\n",
            b"abc\n",
            b"12x\n",
            b"-1\n",
            b" 7\n",
            b"7\n\n",
            b"\xff\xfe",
            b"99999999999999999999999\n",
        ] {
            std::fs::write(&p, bad).expect("write");
            let err = CursorFile::open(&p).expect_err("corrupt must be refused");
            assert!(
                matches!(err, CursorError::Corrupt { .. }),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains("refusing"), "{err}");
        }
        std::fs::write(&p, "7").expect("write");
        assert_eq!(load(&p).expect("no newline is fine"), Some(7));
    }

    #[test]
    fn a_failed_store_leaves_the_previous_value() {
        let d = dir();
        let p = d.path().join("cursor");
        let (c, _) = CursorFile::open(&p).expect("open");
        c.store(5).expect("store");
        // A directory where the temporary file goes: the write fails before the rename.
        std::fs::create_dir(sibling(&p, ".tmp")).expect("mkdir");
        let err = c.store(6).expect_err("store must fail");
        assert!(matches!(err, CursorError::Io { .. }), "{err:?}");
        assert_eq!(load(&p).expect("load"), Some(5));
        std::fs::remove_dir(sibling(&p, ".tmp")).expect("rmdir");
        // A stale temporary file (a crash between write and rename) is overwritten.
        std::fs::write(sibling(&p, ".tmp"), "garbage").expect("write");
        assert_eq!(load(&p).expect("load"), Some(5));
        c.store(6).expect("store");
        assert_eq!(load(&p).expect("load"), Some(6));
    }

    #[test]
    fn a_second_relay_on_the_same_cursor_is_refused() {
        let d = dir();
        let p = d.path().join("cursor");
        let (_c, _) = CursorFile::open(&p).expect("open");
        let err = CursorFile::open(&p).expect_err("locked");
        assert!(matches!(err, CursorError::Locked { .. }), "{err:?}");
    }
}
