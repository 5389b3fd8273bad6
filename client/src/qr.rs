//! QR codes for what an app scans: otpauth:// provisioning URIs and device activation
//! codes. The matrix comes from `qrcode`; this module draws it as terminal half blocks or
//! writes it as a PNG.
//!
//! Both carry a secret (the seed in the URI, the one-time activation code): the PNG is
//! created with mode 0600, and neither is ever logged.

use std::io::Write;
use std::path::Path;

use qrcode::{Color, EcLevel, QrCode};

/// Light modules around the code, as ISO/IEC 18004 asks (4).
pub const QUIET_ZONE: usize = 4;
/// Pixels per module in a PNG.
pub const PNG_SCALE: usize = 8;

/// Why a QR code could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit in a QR code.
    #[error("cannot encode the text as a QR code: {0}")]
    Encode(qrcode::types::QrError),
    /// The PNG could not be written.
    #[error("cannot write {path}: {detail}")]
    Write {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        detail: String,
    },
}

/// The module matrix of `text` (error correction M), row-major, `true` = dark, with the
/// quiet zone; and its side length.
pub fn matrix(text: &str) -> Result<(Vec<bool>, usize), QrError> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(QrError::Encode)?;
    let w = code.width();
    let side = w + 2 * QUIET_ZONE;
    let colors = code.to_colors();
    let mut m = vec![false; side * side];
    for y in 0..w {
        for x in 0..w {
            m[(y + QUIET_ZONE) * side + x + QUIET_ZONE] = colors[y * w + x] == Color::Dark;
        }
    }
    Ok((m, side))
}

/// `text` as lines of Unicode half blocks (two module rows per line), for a terminal with
/// a dark background: a block (the light foreground) is a light module, a blank a dark
/// one, as `qrencode -t UTF8` draws. Phone scanners also read the inverted code that a
/// light-background terminal shows; `--qr-png` is the fallback.
pub fn terminal(text: &str) -> Result<String, QrError> {
    let (m, side) = matrix(text)?;
    let light = |x: usize, y: usize| y >= side || !m[y * side + x];
    let mut out = String::with_capacity(side * side);
    for y in (0..side).step_by(2) {
        for x in 0..side {
            out.push(match (light(x, y), light(x, y + 1)) {
                (true, true) => '\u{2588}',
                (true, false) => '\u{2580}',
                (false, true) => '\u{2584}',
                (false, false) => ' ',
            });
        }
        out.push('\n');
    }
    Ok(out)
}

/// Write `text` as a greyscale PNG (black on white, [`PNG_SCALE`] pixels per module),
/// created or truncated with mode 0600.
pub fn write_png(text: &str, path: &Path) -> Result<(), QrError> {
    let (m, side) = matrix(text)?;
    let fail = |detail: String| QrError::Write {
        path: path.to_owned(),
        detail,
    };
    let px = side * PNG_SCALE;
    let mut pixels = Vec::with_capacity(px * px);
    for y in 0..px {
        for x in 0..px {
            let dark = m[(y / PNG_SCALE) * side + x / PNG_SCALE];
            pixels.push(if dark { 0u8 } else { 255 });
        }
    }
    let mut file = private_file(path).map_err(|e| fail(e.to_string()))?;
    {
        let dim = u32::try_from(px).map_err(|e| fail(e.to_string()))?;
        let mut enc = png::Encoder::new(&mut file, dim, dim);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| fail(e.to_string()))?;
        w.write_image_data(&pixels)
            .map_err(|e| fail(e.to_string()))?;
        w.finish().map_err(|e| fail(e.to_string()))?;
    }
    file.flush().map_err(|e| fail(e.to_string()))?;
    file.sync_all().map_err(|e| fail(e.to_string()))
}

/// Open `path` for writing with mode 0600 (also when it existed with a wider mode).
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let f = opts.open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(f)
    }
    #[cfg(not(unix))]
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_has_the_quiet_zone_and_finder_patterns() {
        let (m, side) = matrix("otpauth").unwrap();
        assert_eq!(side, 21 + 2 * QUIET_ZONE);
        assert!(m[..QUIET_ZONE * side].iter().all(|d| !d));
        // The top-left finder pattern's outer ring starts right after the quiet zone.
        assert!(m[QUIET_ZONE * side + QUIET_ZONE]);
        assert!(m[QUIET_ZONE * side + QUIET_ZONE + 6]);
        assert!(!m[(QUIET_ZONE + 1) * side + QUIET_ZONE + 1]);
    }

    #[test]
    fn terminal_lines_are_half_as_many_as_rows() {
        let t = terminal("x").unwrap();
        let side = 21 + 2 * QUIET_ZONE;
        assert_eq!(t.lines().count(), side.div_ceil(2));
        assert!(t.lines().all(|l| l.chars().count() == side));
        // The first line is all quiet zone: light over light.
        assert!(t.lines().next().unwrap().chars().all(|c| c == '\u{2588}'));
    }
}
