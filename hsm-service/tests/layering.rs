//! The layering of `hsm-service/src`, checked: every `crate::<module>` path (in `use`
//! items, `use crate::{a, b}` groups, and paths inside function bodies and macros),
//! every `super::super::<module>` that climbs to the crate root, and every external crate
//! the design confines to one module, against the table below. A module missing from the
//! table fails the test, so the check stays total as modules are added.
//!
//! The scanner is a small tokenizer (comments, strings and char literals blanked out;
//! inline `mod x { .. }` and `#[cfg(test)]` tracked), not a parser: no dependency, and
//! paths inside macro invocations are seen too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// One row of the table: what a top-level module of the crate may import.
struct Rule {
    module: &'static str,
    may_import: &'static [&'static str],
}

/// The documented order, top to bottom (each tier imports only from tiers below it):
///
/// ```text
/// main, testing          the binary; the test fixture (a whole dev service)
/// dev                    `hsm-service dev`: token, PKI, config, then the server
/// logging                tracing set-up from the config
/// server                 wiring: opens token, store, audit log; serves `api` over mTLS
/// api                    tonic services: proto <-> domain, errors -> Status
/// ceremony               domain: quorum ceremonies (create keys, rotate seed keys)
/// credentials, signing   domain (`devices`, `events` join this tier)
/// auth, pki              identity and role gate; certificates (pure, two-phase)
/// config, audit          settings vocabulary; the hash-chained audit log
/// error, store           the domain error type; the storage interface
/// hsm                    the PKCS#11 boundary
/// otp                    HOTP/TOTP math
/// common, metrics        leaves: hex, clock, roles, key names, algorithms, public keys;
///                        the Prometheus registry
/// ```
///
/// This refines DESIGN's `api -> {credentials, devices, signing, ceremony, events} ->
/// {otp, store, audit, hsm}`: it orders the modules inside each tier and places the
/// infrastructure DESIGN does not name. Each row lists exactly what a module may import
/// (`the_table_has_no_cycle` checks the rows form no cycle); `common` is the leaf every
/// module may use. Widen a row only with a reason in its comment.
const TABLE: &[Rule] = &[
    // Leaf: small shared vocabulary. Imports nothing from the crate, so nobody imports
    // upwards for a helper (hex, clock, auth methods, roles, key names, algorithms,
    // public keys and their SPKI/JWK forms).
    Rule {
        module: "common",
        may_import: &[],
    },
    // Leaf: the process's Prometheus registry and the functions that move its figures.
    // Imports nothing from the crate, so the HSM pool, the group committer, the audit
    // log and the event stream record into it without importing upwards.
    Rule {
        module: "metrics",
        may_import: &[],
    },
    // HOTP/TOTP math: pure, no I/O.
    Rule {
        module: "otp",
        may_import: &["common"],
    },
    // The PKCS#11 boundary: never sees store or proto types (nor `error`: it has its
    // own). It computes the OTP HMACs, so it names `otp`'s hash algorithms.
    Rule {
        module: "hsm",
        may_import: &["common", "metrics", "otp"],
    },
    // The storage interface and its engines: never a domain module, never `audit`,
    // nothing that could import it back. Records name `otp`'s kinds and algorithms.
    Rule {
        module: "store",
        may_import: &["common", "metrics", "otp"],
    },
    // The domain error type; it wraps the HSM's error (`From<hsm::Error>`), so it is
    // not a leaf: `hsm` and `store` do not use it. It names `store` for the one mapping
    // of a store failure (`store_failure`: retryable ones are UNAVAILABLE).
    Rule {
        module: "error",
        may_import: &["common", "hsm", "store"],
    },
    // The audit log: records hashed, checkpoints signed with the audit key (`hsm`),
    // written through the store's unit of work.
    Rule {
        module: "audit",
        may_import: &["common", "error", "hsm", "metrics", "store"],
    },
    // The configuration file's types, read by every layer above. It names settings,
    // never behaviour: the HSM's token selector, the store's tenant-name rule.
    Rule {
        module: "config",
        may_import: &["common", "hsm", "store"],
    },
    // Peer certificate -> identity (tenant, role), the per-RPC role gate; a denial is
    // an audit record. Domain modules take its `Identity`.
    Rule {
        module: "auth",
        may_import: &["audit", "common", "config", "error"],
    },
    // CSRs and certificates (x509-cert + der). Pure and two-phase: `signing` and
    // `ceremony` have the HSM sign what it builds.
    Rule {
        module: "pki",
        may_import: &["common"],
    },
    // Domain: credential lifecycle, verification policy, evidence of a verification.
    Rule {
        module: "credentials",
        may_import: &["audit", "common", "config", "error", "hsm", "otp", "store"],
    },
    // Domain: assertions bound to evidence, JWKS by usage, raw signatures, key
    // versions, certificates of keys (`pki`).
    Rule {
        module: "signing",
        may_import: &["audit", "common", "config", "error", "hsm", "pki", "store"],
    },
    // Domain: plans, officer quorum (`auth`'s identities), execution (creates signing
    // keys, rotates seed master keys: hence `signing` and `credentials`), backups.
    Rule {
        module: "ceremony",
        may_import: &[
            "audit",
            "auth",
            "common",
            "config",
            "credentials",
            "error",
            "hsm",
            "pki",
            "signing",
            "store",
        ],
    },
    // The event stream's reader side (list, watch, retention, preferences); events are
    // written by the domain modules through `store::events`.
    Rule {
        module: "events",
        may_import: &["audit", "common", "config", "error", "metrics", "store"],
    },
    // Domain: the app authenticator (devices, activations, challenges). Like
    // `credentials`, plus `signing` for the challenge signature (a key of usage
    // `challenge`) made in the HSM, and `metrics` (challenges by state).
    Rule {
        module: "devices",
        may_import: &[
            "audit", "common", "config", "error", "hsm", "metrics", "signing", "store",
        ],
    },
    // tonic services: proto <-> domain, errors -> Status. Never imported by the domain.
    Rule {
        module: "api",
        may_import: &[
            "audit",
            "auth",
            "ceremony",
            "common",
            "credentials",
            "devices",
            "error",
            "events",
            "hsm",
            "metrics",
            "otp",
            "pki",
            "signing",
            "store",
        ],
    },
    // Wiring: opens the token, the store and the audit log, builds the services, serves
    // them over mTLS. Everything below it.
    Rule {
        module: "server",
        may_import: BELOW_SERVER,
    },
    // Log set-up (format from the config).
    Rule {
        module: "logging",
        may_import: &["common", "config"],
    },
    // `hsm-service dev`: creates a SoftHSM token, a development PKI and a config, then
    // runs the server.
    Rule {
        module: "dev",
        may_import: BELOW_DEV,
    },
    // Test fixture (`#[doc(hidden)]`): a dev environment with a running server.
    Rule {
        module: "testing",
        may_import: BELOW_TOP,
    },
    // The binary (`src/main.rs`, importing through `hsm_service::`).
    Rule {
        module: "main",
        may_import: BELOW_TOP,
    },
];

const BELOW_SERVER: &[&str] = &[
    "api",
    "audit",
    "auth",
    "ceremony",
    "common",
    "config",
    "credentials",
    "devices",
    "error",
    "events",
    "hsm",
    "metrics",
    "otp",
    "pki",
    "signing",
    "store",
];
const BELOW_DEV: &[&str] = &[
    "api",
    "audit",
    "auth",
    "ceremony",
    "common",
    "config",
    "credentials",
    "devices",
    "error",
    "events",
    "hsm",
    "logging",
    "metrics",
    "otp",
    "pki",
    "server",
    "signing",
    "store",
];
const BELOW_TOP: &[&str] = &[
    "api",
    "audit",
    "auth",
    "ceremony",
    "common",
    "config",
    "credentials",
    "devices",
    "dev",
    "error",
    "events",
    "hsm",
    "logging",
    "metrics",
    "otp",
    "pki",
    "server",
    "signing",
    "store",
];

/// Test code (`#[cfg(test)] mod ..`, inline or in its own file) may in addition use the
/// fixture that starts a whole service; otherwise it keeps its module's layering.
const TEST_CODE_MAY_ALSO_IMPORT: &[&str] = &["testing"];

/// External crates the design confines to some modules: (crate, modules that may name
/// it, why). A module is a path: `store::redb` is `src/store/redb/` (and anything inside
/// it). A path's first segment that is a module declared in the naming module
/// (`pub mod redb;` in `store/mod.rs`, then `redb::RedbBackend`) is that module, not the
/// crate (Rust resolves it so too); `::redb::X`, `use redb;` and `extern crate redb` are
/// always the crate.
const EXTERNAL: &[(&str, &[&str], &str)] = &[
    (
        "cryptoki",
        &["hsm"],
        "hsm is the only module that imports cryptoki",
    ),
    (
        "cryptoki_sys",
        &["hsm"],
        "hsm is the only module that imports cryptoki",
    ),
    (
        "hsm_cryptoki_ext",
        &["hsm"],
        "hsm is the only module that imports cryptoki",
    ),
    (
        "redb",
        &["store::redb"],
        "only store/redb names the embedded engine's types",
    ),
    (
        "postgres",
        &["store::postgres"],
        "only store/postgres names PostgreSQL types",
    ),
    (
        "tokio_postgres",
        &["store::postgres"],
        "only store/postgres names PostgreSQL types",
    ),
    (
        "tokio_postgres_rustls",
        &["store::postgres"],
        "only store/postgres names PostgreSQL types",
    ),
    (
        "r2d2",
        &["store::postgres"],
        "only store/postgres names PostgreSQL types (its read pool)",
    ),
    (
        "hsm_proto",
        &["api", "server", "dev", "testing", "main"],
        "domain modules, store and hsm never see proto types",
    ),
];

/// Back-imports still excused, each (file under src/, imported module or crate); an entry
/// excuses every line of that file importing it, and an entry that no longer matches
/// anything fails the test. Empty since the `uow` branch: redb is opened only in
/// `store`, `ceremony/shares.rs` no longer names `server::STORE_FILE`, `store` carries no
/// `audit::Event` and takes the failure-count cap from nowhere above it.
const KNOWN_UNTIL_UOW: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------
// The checker.

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    file: String,
    line: usize,
    /// The importing top-level module.
    from: String,
    /// The importing module's whole path (`store::postgres::conn`).
    module: String,
    to: String,
    test_code: bool,
    external: bool,
    /// An external crate named unambiguously (`::x::`, `use x;`, `extern crate x`).
    explicit_crate: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    Violation(Import, String),
    UnknownModule(String),
    StaleTableRow(String),
    Unresolved(Import),
    StaleAllowance(String, String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Violation(i, allowed) => {
                let (what, who) = if i.external {
                    ("crate ", &i.module)
                } else {
                    ("", &i.from)
                };
                let test = if i.test_code { " (test code)" } else { "" };
                write!(
                    f,
                    "{}:{}: {}{} imports {}{} ({})",
                    i.file, i.line, who, test, what, i.to, allowed
                )
            }
            Problem::UnknownModule(m) => write!(
                f,
                "module `{m}` is not in the layering table (tests/layering.rs): add its row"
            ),
            Problem::StaleTableRow(m) => {
                write!(f, "the layering table names `{m}`, which is not a module")
            }
            Problem::Unresolved(i) => write!(
                f,
                "{}:{}: {} imports `crate::{}`, which is neither a module nor a re-export of one",
                i.file, i.line, i.from, i.to
            ),
            Problem::StaleAllowance(file, to) => write!(
                f,
                "KNOWN_UNTIL_UOW allows {file} -> {to}, which no longer happens: remove the entry"
            ),
        }
    }
}

/// Replace comments, string and char literals by spaces (newlines kept, so line
/// numbers stay right).
fn blank_non_code(src: &str) -> Vec<char> {
    let c: Vec<char> = src.chars().collect();
    let mut out = c.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for ch in out.iter_mut().take(to).skip(from) {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            let end = c[i..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(c.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if c[i] == '/' && next == Some('*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < c.len() && depth > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c[i] == 'r' && (i == 0 || !ident(c[i - 1]) || matches!(c[i - 1], 'b' | 'c')) {
            // A raw string r"..", r#".."#, br#".."# (but not the raw identifier r#type).
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) == Some(&'"') {
                let hashes = j - i - 1;
                let mut k = j + 1;
                while k < c.len() {
                    if c[k] == '"' && (0..hashes).all(|h| c.get(k + 1 + h) == Some(&'#')) {
                        k += 1 + hashes;
                        break;
                    }
                    k += 1;
                }
                blank(&mut out, i, k);
                i = k;
            } else {
                i += 1;
            }
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if c[i] == '\'' {
            // A char literal ('a', '\n', '\u{1F}', '\'') or a lifetime ('a, 'static).
            if next == Some('\\') {
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                blank(&mut out, i, i + 3);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

#[derive(Debug)]
struct Token {
    text: String,
    line: usize,
}

fn tokenize(src: &str) -> Vec<Token> {
    let c = blank_non_code(src);
    let mut tokens = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            if !ch.is_ascii_digit() {
                tokens.push(Token {
                    text: c[start..i].iter().collect(),
                    line,
                });
            }
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            tokens.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                text: ch.to_string(),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// The module path of a file under src/: `signing/jws.rs` -> [signing, jws],
/// `signing/mod.rs` -> [signing], `lib.rs` -> [], `main.rs` -> [main].
fn module_path(file: &str) -> Vec<String> {
    let stem = file.strip_suffix(".rs").unwrap_or(file);
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// What one file imports. `test_files` are module paths declared `#[cfg(test)] mod x;`
/// (filled by this scan for the files below); `declared` every module path a `mod x;` or
/// `mod x { .. }` declares.
fn scan_file(
    file: &str,
    src: &str,
    externals: &BTreeSet<&str>,
    test_files: &mut BTreeSet<Vec<String>>,
    declared: &mut BTreeSet<Vec<String>>,
) -> Vec<(Import, Vec<String>)> {
    let t = tokenize(src);
    let tok = |i: usize| t.get(i).map_or("", |x| x.text.as_str());
    let is_main = file == "main.rs";
    let file_path = module_path(file);
    // Inline modules open at this point: (name, brace depth inside it, test code).
    let mut scopes: Vec<(String, usize, bool)> = Vec::new();
    let mut test_braces = BTreeSet::new();
    let mut depth = 0usize;
    let mut found = Vec::new();
    let current = |scopes: &[(String, usize, bool)]| {
        let mut p = file_path.clone();
        p.extend(scopes.iter().map(|s| s.0.clone()));
        p
    };
    let mut i = 0;
    while i < t.len() {
        let here = tok(i);
        // `#[cfg(test)]` (then maybe more attributes and a visibility) before `mod x`.
        if here == "#"
            && tok(i + 1) == "["
            && tok(i + 2) == "cfg"
            && tok(i + 3) == "("
            && tok(i + 4) == "test"
            && tok(i + 5) == ")"
            && tok(i + 6) == "]"
        {
            let mut j = i + 7;
            loop {
                if tok(j) == "#" && tok(j + 1) == "[" {
                    let mut d = 0;
                    while j < t.len() {
                        match tok(j) {
                            "[" => d += 1,
                            "]" => {
                                d -= 1;
                                if d == 0 {
                                    j += 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                } else if tok(j) == "pub" && tok(j + 1) == "(" {
                    while j < t.len() && tok(j) != ")" {
                        j += 1;
                    }
                    j += 1;
                } else if tok(j) == "pub" {
                    j += 1;
                } else {
                    break;
                }
            }
            if tok(j) == "mod" && is_ident(tok(j + 1)) {
                match tok(j + 2) {
                    "{" => {
                        test_braces.insert(j + 2);
                    }
                    ";" => {
                        let mut p = current(&scopes);
                        p.push(tok(j + 1).to_owned());
                        test_files.insert(p);
                    }
                    _ => {}
                }
            }
        }
        if here == "mod" && is_ident(tok(i + 1)) && matches!(tok(i + 2), "{" | ";") {
            let mut p = current(&scopes);
            p.push(tok(i + 1).to_owned());
            declared.insert(p);
        }
        if here == "mod" && is_ident(tok(i + 1)) && tok(i + 2) == "{" {
            let parent_test = scopes.last().is_some_and(|s| s.2);
            depth += 1;
            scopes.push((
                tok(i + 1).to_owned(),
                depth,
                parent_test || test_braces.contains(&(i + 2)),
            ));
            i += 3;
            continue;
        }
        if here == "mod"
            && is_ident(tok(i + 1))
            && tok(i + 2) == ";"
            && scopes.last().is_some_and(|s| s.2)
        {
            // `mod x;` inside a test module: x's file is test code too.
            let mut p = current(&scopes);
            p.push(tok(i + 1).to_owned());
            test_files.insert(p);
        }
        if here == "{" {
            depth += 1;
        } else if here == "}" {
            if scopes.last().is_some_and(|s| s.1 == depth) {
                scopes.pop();
            }
            depth = depth.saturating_sub(1);
        }
        let prev = if i == 0 { "" } else { tok(i - 1) };
        let path_start = prev != "::" && tok(i + 1) == "::";
        let at = |to: String, external: bool| {
            (
                Import {
                    file: file.to_owned(),
                    line: t[i].line,
                    from: file_path.first().cloned().unwrap_or_default(),
                    module: current(&scopes).join("::"),
                    to,
                    test_code: scopes.last().is_some_and(|s| s.2),
                    external,
                    explicit_crate: false,
                },
                current(&scopes),
            )
        };
        if externals.contains(here) {
            let before = if i < 2 { "" } else { tok(i - 2) };
            // `::x::..` at the start of a path (not `a::x`, `T>::x`, `f()::x`).
            let keyword = matches!(
                before,
                "use" | "pub" | "return" | "let" | "in" | "as" | "dyn" | "impl" | "mut" | "ref"
            );
            let leading =
                prev == "::" && (keyword || (!is_ident(before) && !matches!(before, ">" | ")")));
            let explicit = leading
                || (prev == "use" && matches!(tok(i + 1), ";" | "as"))
                || (prev == "crate" && before == "extern");
            if explicit || path_start {
                let (mut imp, path) = at(here.to_owned(), true);
                imp.explicit_crate = explicit;
                found.push((imp, path));
            }
        }
        let crate_root = here == "crate" || (is_main && here == "hsm_service");
        if path_start && (crate_root || here == "super" || here == "self") {
            let mut base = if crate_root {
                Vec::new()
            } else if here == "self" {
                current(&scopes)
            } else {
                let mut p = current(&scopes);
                p.pop();
                p
            };
            let mut j = i + 2;
            while tok(j) == "super" && tok(j + 1) == "::" {
                base.pop();
                j += 2;
            }
            if is_main && here == "crate" {
                // The binary's own items.
            } else if let Some(top) = base.first() {
                found.push(at(top.clone(), false));
            } else if tok(j) == "{" {
                // use crate::{a::x, b, c::{..}}: the first name of each item.
                let (mut d, mut k, mut item_start) = (0, j, true);
                while k < t.len() {
                    match tok(k) {
                        "{" => {
                            d += 1;
                            item_start = d == 1;
                        }
                        "}" => {
                            d -= 1;
                            if d == 0 {
                                break;
                            }
                        }
                        "," => item_start = d == 1,
                        name => {
                            if item_start && is_ident(name) && name != "self" {
                                let (mut imp, path) = at(name.to_owned(), false);
                                imp.line = t[k].line;
                                found.push((imp, path));
                            }
                            item_start = false;
                        }
                    }
                    k += 1;
                }
            } else if is_ident(tok(j)) {
                found.push(at(tok(j).to_owned(), false));
            }
        }
        i += 1;
    }
    found
}

/// Check a source tree given as (path under src/, text). `lib.rs` must be among them:
/// its `mod` items are the crate's modules, its `pub use m::{..}` the re-exports.
fn check(files: &[(String, String)], allow: &[(&str, &str)]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let lib = files
        .iter()
        .find(|(f, _)| f == "lib.rs")
        .map(|(_, s)| tokenize(s))
        .expect("lib.rs");
    let mut modules: BTreeSet<String> = BTreeSet::from(["main".to_owned()]);
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    for (i, w) in lib.windows(3).enumerate() {
        if w[0].text == "mod" && w[2].text == ";" {
            modules.insert(w[1].text.clone());
        }
        if w[0].text == "use" && w[2].text == "::" {
            let mut k = i + 3;
            while k < lib.len() && lib[k].text != ";" {
                if is_ident(&lib[k].text) {
                    reexports.insert(lib[k].text.clone(), w[1].text.clone());
                }
                k += 1;
            }
        }
    }
    let table: BTreeMap<&str, &[&str]> = TABLE.iter().map(|r| (r.module, r.may_import)).collect();
    for m in &modules {
        if !table.contains_key(m.as_str()) {
            problems.push(Problem::UnknownModule(m.clone()));
        }
    }
    for m in table.keys() {
        if !modules.contains(*m) {
            problems.push(Problem::StaleTableRow((*m).to_owned()));
        }
    }
    let externals: BTreeSet<&str> = EXTERNAL.iter().map(|e| e.0).collect();
    let mut test_files = BTreeSet::new();
    let mut declared = BTreeSet::new();
    let mut imports = Vec::new();
    for (file, src) in files {
        if file == "lib.rs" {
            // The crate root only declares modules and re-exports.
            continue;
        }
        imports.extend(scan_file(
            file,
            src,
            &externals,
            &mut test_files,
            &mut declared,
        ));
    }
    // A crate-named path inside a module that declares a module of that name is the
    // module (`redb::RedbBackend` in store/mod.rs).
    imports.retain(|(imp, path)| {
        if !imp.external || imp.explicit_crate {
            return true;
        }
        let mut local = path.clone();
        local.push(imp.to.clone());
        !declared.contains(&local)
    });
    let mut used_allowances = BTreeSet::new();
    for (mut imp, path) in imports {
        if (1..=path.len()).any(|n| test_files.contains(&path[..n])) {
            imp.test_code = true;
        }
        if !imp.external {
            if !modules.contains(&imp.to) {
                match reexports.get(&imp.to) {
                    Some(m) => imp.to = m.clone(),
                    None => {
                        problems.push(Problem::Unresolved(imp));
                        continue;
                    }
                }
            }
            if imp.to == imp.from {
                continue;
            }
        }
        let mut allowed: Vec<&str> = if imp.external {
            let e = EXTERNAL.iter().find(|e| e.0 == imp.to).expect("external");
            e.1.to_vec()
        } else {
            table
                .get(imp.from.as_str())
                .map_or(Vec::new(), |a| a.to_vec())
        };
        if imp.test_code && !imp.external {
            allowed.extend(TEST_CODE_MAY_ALSO_IMPORT);
        }
        let ok = if imp.external {
            allowed.iter().any(|a| {
                let a: Vec<&str> = a.split("::").collect();
                path.len() >= a.len() && path.iter().zip(&a).all(|(p, a)| p == a)
            })
        } else {
            allowed.contains(&imp.to.as_str())
        };
        if ok || !table.contains_key(imp.from.as_str()) {
            continue;
        }
        if let Some(a) = allow.iter().find(|a| a.0 == imp.file && a.1 == imp.to) {
            used_allowances.insert(*a);
            continue;
        }
        let allowed = if imp.external {
            let e = EXTERNAL.iter().find(|e| e.0 == imp.to).expect("external");
            format!(
                "{} may be named only in {}: {}",
                imp.to,
                e.1.join(", "),
                e.2
            )
        } else if allowed.is_empty() {
            format!("{} may import only nothing", imp.from)
        } else {
            format!("{} may import only {}", imp.from, allowed.join(", "))
        };
        problems.push(Problem::Violation(imp, allowed));
    }
    for a in allow {
        if !used_allowances.contains(a) {
            problems.push(Problem::StaleAllowance(a.0.to_owned(), a.1.to_owned()));
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

fn read_tree(root: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read src/")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(root).expect("under src/");
                let rel = rel.to_string_lossy().replace('\\', "/");
                out.push((rel, std::fs::read_to_string(&p).expect("read source")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

fn src_tree() -> Vec<(String, String)> {
    let root = std::env::var_os("LAYERING_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    read_tree(&root)
}

#[test]
fn the_table_has_no_cycle() {
    // Depth-first search over the rows; a module on the current path seen again is a
    // cycle.
    fn visit<'a>(m: &'a str, path: &mut Vec<&'a str>, done: &mut BTreeSet<&'a str>) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!(
                "cycle in the layering table: {} -> {m}",
                path[at..].join(" -> ")
            );
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        let row = TABLE.iter().find(|r| r.module == m);
        for next in row.map_or(&[][..], |r| r.may_import) {
            assert!(
                TABLE.iter().any(|r| r.module == *next),
                "{m} may import {next}, which has no row"
            );
            visit(next, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for r in TABLE {
        visit(r.module, &mut Vec::new(), &mut done);
    }
    // Every row but the two leaves may use `common`.
    assert!(TABLE
        .iter()
        .all(|r| matches!(r.module, "common" | "metrics") || r.may_import.contains(&"common")));
}

#[test]
fn every_module_imports_only_what_sits_below_it() {
    let files = src_tree();
    assert!(files.len() > 50, "read the source tree");
    let problems = check(&files, KNOWN_UNTIL_UOW);
    for p in &problems {
        println!("{p}");
    }
    assert!(
        problems.is_empty(),
        "{} layering problem(s):\n{}",
        problems.len(),
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The checker's own tests: it must fail on a planted back-import.

fn with_planted(file: &str, src: &str) -> Vec<(String, String)> {
    let mut files = src_tree();
    files.push((file.to_owned(), src.to_owned()));
    files
}

fn violations(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(|p| p.to_string()).collect()
}

#[test]
fn a_planted_back_import_is_reported() {
    let src = "//! planted\nuse crate::common::hex;\n\nfn f() {\n    let _ = crate::api::State::default();\n}\n";
    let problems = check(&with_planted("store/x.rs", src), KNOWN_UNTIL_UOW);
    let v = violations(&problems);
    assert!(
        v.contains(
            &"store/x.rs:5: store imports api (store may import only common, metrics, otp)"
                .to_owned()
        ),
        "{v:#?}"
    );
    assert!(!v.iter().any(|l| l.starts_with("store/x.rs:2:")), "{v:#?}");
}

#[test]
fn groups_super_super_and_nested_modules_are_followed() {
    let src = "use crate::{\n    common::hex,\n    signing::{self, KeyAlgorithm},\n    Error,\n};\nmod inner {\n    use super::super::super::super::ceremony::Plan;\n}\nfn g() { super::super::super::credentials::f(); }\nfn same() { super::super::api_like::f(); }\n";
    let v = violations(&check(
        &with_planted("store/redb/x.rs", src),
        KNOWN_UNTIL_UOW,
    ));
    for want in [
        "store/redb/x.rs:3: store imports signing (store may import only common, metrics, otp)",
        "store/redb/x.rs:4: store imports error (store may import only common, metrics, otp)",
        "store/redb/x.rs:7: store imports ceremony (store may import only common, metrics, otp)",
        "store/redb/x.rs:9: store imports credentials (store may import only common, metrics, otp)",
    ] {
        assert!(v.contains(&want.to_owned()), "missing {want}: {v:#?}");
    }
    // `super::super` from store/redb/x.rs is `store` itself.
    assert!(
        !v.iter().any(|l| l.starts_with("store/redb/x.rs:10:")),
        "{v:#?}"
    );
}

#[test]
fn comments_strings_and_same_module_paths_are_not_imports() {
    let src = "// use crate::api::X;\n/* crate::server::Y */\nconst S: &str = \"crate::api::Z\";\nconst R: &str = r#\"crate::api::\"#;\nconst C: char = '\\'';\nfn h<'a>(x: &'a str) { super::common_helper(x); crate::hsm::f(); }\n";
    let v = violations(&check(&with_planted("hsm/x.rs", src), KNOWN_UNTIL_UOW));
    assert!(!v.iter().any(|l| l.starts_with("hsm/x.rs")), "{v:#?}");
}

#[test]
fn test_code_may_use_the_fixture_but_keeps_its_layering() {
    let src = "#[cfg(test)]\nmod tests {\n    use crate::testing::DevEnv;\n    use crate::server::STORE_FILE;\n}\nuse crate::testing::DevEnv;\n";
    let v = violations(&check(&with_planted("otp/x.rs", src), KNOWN_UNTIL_UOW));
    assert!(!v.iter().any(|l| l.starts_with("otp/x.rs:3:")), "{v:#?}");
    assert!(
        v.contains(
            &"otp/x.rs:4: otp (test code) imports server (otp may import only common, testing)"
                .to_owned()
        ),
        "{v:#?}"
    );
    assert!(
        v.contains(&"otp/x.rs:6: otp imports testing (otp may import only common)".to_owned()),
        "{v:#?}"
    );
}

#[test]
fn external_crates_stay_in_their_module() {
    let src = "fn k() { let _ = cryptoki::types::Ulong::from(1u64); }\nuse redb::Database;\n";
    let v = violations(&check(&with_planted("signing/x.rs", src), KNOWN_UNTIL_UOW));
    assert!(
        v.iter()
            .any(|l| l.starts_with("signing/x.rs:1: signing::x imports crate cryptoki")),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|l| l.starts_with("signing/x.rs:2: signing::x imports crate redb")),
        "{v:#?}"
    );
}

/// Inside `store` each engine's crate stays in its own directory: redb in
/// `store/redb/`, the PostgreSQL crates in `store/postgres/`.
#[test]
fn engine_crates_stay_in_their_engine_directory() {
    let src = "use redb::Database;\nfn p() { let _ = postgres::Config::new(); }\nuse r2d2::Pool;\nfn q(_: tokio_postgres::Error, _: tokio_postgres_rustls::MakeRustlsConnect) {}\n";
    let v = violations(&check(&with_planted("store/x.rs", src), KNOWN_UNTIL_UOW));
    for want in [
        "store/x.rs:1: store::x imports crate redb (redb may be named only in store::redb: only store/redb names the embedded engine's types)",
        "store/x.rs:2: store::x imports crate postgres (postgres may be named only in store::postgres: only store/postgres names PostgreSQL types)",
        "store/x.rs:3: store::x imports crate r2d2 (r2d2 may be named only in store::postgres: only store/postgres names PostgreSQL types (its read pool))",
    ] {
        assert!(v.contains(&want.to_owned()), "missing {want}: {v:#?}");
    }
    for c in ["tokio_postgres", "tokio_postgres_rustls"] {
        assert!(
            v.iter()
                .any(|l| l.starts_with(&format!("store/x.rs:4: store::x imports crate {c} "))),
            "{c}: {v:#?}"
        );
    }
    // Each engine's crate in the other engine's directory.
    let v = violations(&check(
        &with_planted(
            "store/postgres/x.rs",
            "use redb::Database;\nuse postgres::Client;\n",
        ),
        KNOWN_UNTIL_UOW,
    ));
    assert!(
        v.iter().any(|l| l
            .starts_with("store/postgres/x.rs:1: store::postgres::x imports crate redb ")),
        "{v:#?}"
    );
    assert!(
        !v.iter().any(|l| l.starts_with("store/postgres/x.rs:2:")),
        "{v:#?}"
    );
    let v = violations(&check(
        &with_planted(
            "store/redb/x.rs",
            "use redb::Database;\nfn f() { let _ = postgres::Client::connect(); }\n",
        ),
        KNOWN_UNTIL_UOW,
    ));
    assert!(
        !v.iter().any(|l| l.starts_with("store/redb/x.rs:1:")),
        "{v:#?}"
    );
    assert!(
        v.iter()
            .any(|l| l.starts_with("store/redb/x.rs:2: store::redb::x imports crate postgres ")),
        "{v:#?}"
    );
}

/// A module declared with a crate's name (`pub mod redb;`) is named through that name
/// without naming the crate; a leading `::`, `use redb;` or `extern crate` is the crate.
#[test]
fn a_module_named_like_a_crate_is_not_the_crate() {
    let src = "pub mod redb;\nmod postgres {\n    pub fn f() {}\n}\npub use self::redb::X;\nfn f() { let _ = redb::Backend::open(); postgres::f(); }\nfn g() { let _ = ::redb::Database::create(); }\nmod inner {\n    fn h() { let _ = redb::Database::create(); }\n}\nuse r2d2;\nextern crate tokio_postgres;\nuse ::redb::Database;\n";
    let v = violations(&check(&with_planted("store/y.rs", src), KNOWN_UNTIL_UOW));
    for line in [1, 5, 6] {
        assert!(
            !v.iter()
                .any(|l| l.starts_with(&format!("store/y.rs:{line}:"))),
            "line {line}: {v:#?}"
        );
    }
    for want in [
        "store/y.rs:7: store::y imports crate redb ",
        // `inner` declares no `redb`: there the name is the crate's.
        "store/y.rs:9: store::y::inner imports crate redb ",
        "store/y.rs:11: store::y imports crate r2d2 ",
        "store/y.rs:12: store::y imports crate tokio_postgres ",
        "store/y.rs:13: store::y imports crate redb ",
    ] {
        assert!(
            v.iter().any(|l| l.starts_with(want)),
            "missing {want}: {v:#?}"
        );
    }
}

#[test]
fn a_stale_allowance_fails() {
    let v = violations(&check(&src_tree(), &[("otp/mod.rs", "api")]));
    assert!(
        v.contains(
            &"KNOWN_UNTIL_UOW allows otp/mod.rs -> api, which no longer happens: remove the entry"
                .to_owned()
        ),
        "{v:#?}"
    );
}

#[test]
fn a_module_missing_from_the_table_fails() {
    let mut files = src_tree();
    for (f, s) in &mut files {
        if f == "lib.rs" {
            s.push_str("\npub mod newcomer;\n");
        }
    }
    let v = violations(&check(&files, KNOWN_UNTIL_UOW));
    assert!(
        v.iter()
            .any(|l| l.starts_with("module `newcomer` is not in the layering table")),
        "{v:#?}"
    );
}
