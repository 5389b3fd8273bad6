//! Names of keys (`assertion`, `raw`, ...), as config files and requests spell them.

/// What a key name may look like (said in error messages).
pub const KEY_NAME_RULE: &str =
    "a key name is 1 to 64 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit";

/// True when `name` follows [`KEY_NAME_RULE`].
pub fn valid_key_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}
