//! The one gate every string passes before it goes into a record.
//!
//! Record strings come partly from callers (a certificate's subject, a credential id, a
//! method path, a reason quoting an error): unbounded, they would let one request write
//! megabytes into the trail (and into every export and verification of it), and control
//! or bidirectional-override characters would let it forge what a reader of an export
//! sees. [`bounded`] is applied by every builder of a record ([`crate::Actor`],
//! [`crate::Event`], [`crate::Details`]), so no path can skip it.

/// Longest `object` (an id, a method name), in bytes.
pub const MAX_OBJECT_LEN: usize = 256;
/// Longest actor subject (a certificate's CN), in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;
/// Longest actor fingerprint: 64 hex digits (SHA-256).
pub const MAX_FINGERPRINT_LEN: usize = 64;
/// Longest failure reason of an outcome, in bytes.
pub const MAX_REASON_LEN: usize = 256;
/// Longest string value in `details`, in bytes (room for a small JSON summary).
pub const MAX_DETAIL_LEN: usize = 4096;

/// What marks a cut string: the reader sees that the original was longer.
const CUT: char = '…';

/// `s` as it may be recorded: every control, format or bidirectional-override character
/// replaced by U+FFFD, and cut (at a character boundary, ending in `…`) to at most `max`
/// bytes. Strings that are already fine come back unchanged.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max && s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len().min(max.saturating_add(4)));
    for c in s.chars() {
        if out.len() > max {
            break; // it is cut below anyway: never copy more of a huge input
        }
        out.push(if is_unsafe(c) {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        });
    }
    if out.len() > max {
        let mut end = max.saturating_sub(CUT.len_utf8());
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        if out.len() + CUT.len_utf8() <= max {
            out.push(CUT);
        }
    }
    out
}

/// Characters a reader of an export must never be shown raw: C0/C1 controls, zero-width
/// and bidirectional formatting characters, the byte-order mark.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fine_strings_are_unchanged() {
        for s in ["", "hsm.v1.CredentialService/VerifyCode", "ünïcödé 𝄞 ok"] {
            assert_eq!(bounded(s, 256), s);
        }
    }

    #[test]
    fn unsafe_characters_are_replaced() {
        assert_eq!(
            bounded("a\nb\u{0}c\u{7f}d", 64),
            "a\u{fffd}b\u{fffd}c\u{fffd}d"
        );
        assert_eq!(
            bounded("x\u{202e}y\u{2066}z\u{feff}", 64),
            "x\u{fffd}y\u{fffd}z\u{fffd}"
        );
    }

    #[test]
    fn long_strings_are_cut_at_a_boundary_with_a_marker() {
        let long = "a".repeat(1 << 20);
        let cut = bounded(&long, 256);
        assert_eq!(cut.len(), 256);
        assert!(cut.ends_with('…') && cut.starts_with("aaaa"));
        // Multi-byte characters are never split.
        let wide = "é".repeat(300);
        let cut = bounded(&wide, 255);
        assert!(cut.len() <= 255 && cut.ends_with('…'));
        assert!(cut.trim_end_matches('…').chars().all(|c| c == 'é'));
        // Exactly the limit is not cut.
        assert_eq!(bounded(&"b".repeat(256), 256), "b".repeat(256));
        // A limit below the marker's size still bounds.
        assert!(bounded("abcdef", 2).len() <= 2);
        for max in 0..12 {
            for s in ["", "abc", "é𝄞x\nyz", "𝄞𝄞𝄞𝄞"] {
                assert!(bounded(s, max).len() <= max, "{s:?} {max}");
            }
        }
    }
}
