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
}
