//! Shared set-up for the criterion benches: a throw-away dev token, and a bare cryptoki
//! session on it for the "no service around it" baselines.
//!
//! The benches measure the service's own code paths against the same operation done
//! directly through cryptoki in the same run, so that figures are read as ratios.

use cryptoki::session::{Session, UserType};
use hsm_service::hsm::{module, Hsm, HsmSettings};
use hsm_service::testing::DevEnv;
use secrecy::SecretString;

/// A dev token with the service's session pool and a direct session next to it.
pub struct Bench {
    /// Keeps the token directory alive.
    pub env: DevEnv,
    /// The service's HSM handle (pool of `sessions`).
    pub hsm: Hsm,
}

impl Bench {
    /// A fresh token, and a pool of `sessions` sessions on it.
    pub fn new(sessions: usize) -> Bench {
        let env = DevEnv::new();
        let settings = HsmSettings {
            module: env.config.hsm.module.clone(),
            token: env.config.token(),
            sessions,
            queue_capacity: 4096,
            seed_cache_capacity: 100_000,
        };
        let hsm = Hsm::open(&settings, env.config.user_pin().expect("pin")).expect("open HSM");
        Bench { env, hsm }
    }

    /// A logged-in cryptoki session on the same token, outside the service.
    pub fn direct_session(&self) -> Session {
        let ctx = module::load(&self.env.config.hsm.module).expect("module");
        let slot = module::find_token(&ctx, &self.env.config.token()).expect("token");
        let session = ctx.open_rw_session(slot).expect("session");
        let pin: SecretString = self.env.config.user_pin().expect("pin");
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => panic!("login: {e}"),
        }
        session
    }
}
