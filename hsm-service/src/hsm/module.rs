//! Loading the PKCS#11 module, finding the token, and (dev and tests only) initializing one.
//!
//! A PKCS#11 library may be initialized once per process (a second `C_Initialize` is
//! `CKR_CRYPTOKI_ALREADY_INITIALIZED`, and a `C_Finalize` would pull the rug from every
//! other user), so loaded modules live in a process-wide registry keyed by path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::{Error, Result};

/// Which token to use. Slot numbers change between boots and hosts, so a token is named
/// by its label or its serial number, never by slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// `CK_TOKEN_INFO.label`, trailing blanks ignored.
    Label(String),
    /// `CK_TOKEN_INFO.serialNumber`, trailing blanks ignored.
    Serial(String),
}

impl std::fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label {l:?}"),
            TokenSelector::Serial(s) => write!(f, "serial number {s:?}"),
        }
    }
}

/// Load `path` and initialize it with OS locking, or return the context this process
/// already has for it.
pub fn load(path: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let key = path.canonicalize().map_err(|e| Error::Load {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = modules.get(&key) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&key).map_err(|e| Error::Load {
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(e.into()),
    }
    modules.insert(key, ctx.clone());
    Ok(ctx)
}

/// The slot holding the initialized token that `selector` names.
pub fn find_token(ctx: &Pkcs11, selector: &TokenSelector) -> Result<Slot> {
    // Slots whose CK_TOKEN_INFO cryptoki cannot parse (opencryptoki 3.8 writes utcTime as
    // "HH:MM:SS", not the 16 digits PKCS#11 requires): named if no other slot matches.
    let mut unreadable = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let info = match ctx.get_token_info(slot) {
            Ok(info) if info.token_initialized() => info,
            Ok(_) => continue,
            Err(e @ CkError::Pkcs11(..)) => return Err(e.into()),
            Err(e) => {
                unreadable.push(format!("slot {}: {e}", slot.id()));
                continue;
            }
        };
        let matches = match selector {
            TokenSelector::Label(l) => info.label().trim_end() == l,
            TokenSelector::Serial(s) => info.serial_number().trim_end() == s,
        };
        if matches {
            return Ok(slot);
        }
    }
    if unreadable.is_empty() {
        return Err(Error::TokenNotFound(selector.to_string()));
    }
    Err(Error::TokenNotFound(format!(
        "{selector}; C_GetTokenInfo gave a CK_TOKEN_INFO that cannot be read for {}",
        unreadable.join(", ")
    )))
}

/// Initialize a fresh token called `label` on a free slot and set its user PIN. For dev
/// mode and tests: production tokens are initialized by their operators.
pub fn init_token(
    ctx: &Pkcs11,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<Slot> {
    // Two threads must not pick the same free slot.
    static INIT: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
    let free = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|slot| {
            ctx.get_token_info(*slot)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| Error::Invalid("no slot with an uninitialized token".into()))?;
    ctx.init_token(free, so_pin, label)?;
    // SoftHSM moves a freshly initialized token to a new slot id: look it up again.
    let slot = find_token(ctx, &TokenSelector::Label(label.to_owned()))?;
    let session = ctx.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin))?;
    session.init_pin(user_pin)?;
    session.logout()?;
    Ok(slot)
}
