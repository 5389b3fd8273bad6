//! Random number generation (`C_GenerateRandom`).

use zeroize::Zeroizing;

use super::{Hsm, Result};

impl Hsm {
    /// `len` bytes from the token's RNG. The buffer is zeroized on drop since callers use
    /// it for identifiers and nonces as well as for key material.
    pub async fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.inner
            .pool
            .submit(move |w| {
                w.run(true, |s, _| {
                    let mut buf = Zeroizing::new(vec![0u8; len]);
                    s.generate_random_slice(&mut buf)?;
                    Ok(buf)
                })
            })
            .await
    }
}
