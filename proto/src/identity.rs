//! A peer's persistent identity: its static Curve25519 key pair.
//!
//! The public half is the Noise static key every other peer sees during the
//! handshake, and (unless overridden with `--name`) the source of the peer's
//! [`PeerName`]. This module only creates and checks keys; storing them on disk
//! is the caller's job.

use std::fmt;

use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

use crate::peer::PeerName;

/// Noise parameters used only to reach snow's key generator (any X25519 pattern works).
const KEYGEN_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";

/// Why a key could not be turned into an [`Identity`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    /// The all-zero private key: almost certainly an unset or wiped key file.
    #[error("private key is all zeros")]
    ZeroKey,
    /// Hex text was not 64 hex digits.
    #[error("private key must be 64 hex digits")]
    BadHex,
    /// snow could not provide Curve25519 (a build-feature problem, not bad input).
    #[error("curve25519 unavailable: {0}")]
    Unavailable(String),
}

/// A static X25519 key pair.
///
/// `Debug` prints the public key only.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub private: [u8; 32],
    pub public: [u8; 32],
}

impl Identity {
    /// A fresh random key pair (from the system RNG, through snow).
    pub fn generate() -> Identity {
        // Both calls fail only when snow was built without an RNG or Curve25519,
        // which proto's Cargo.toml rules out; nothing here depends on input.
        let params = KEYGEN_PARAMS.parse().expect("static Noise parameter string parses");
        let kp = snow::Builder::new(params).generate_keypair().expect("snow built with curve25519 and an RNG");
        let mut private = [0u8; 32];
        let mut public = [0u8; 32];
        private.copy_from_slice(&kp.private);
        public.copy_from_slice(&kp.public);
        Identity { private, public }
    }

    /// Rebuilds the key pair from a stored private key.
    pub fn from_private(private: [u8; 32]) -> Result<Identity, IdentityError> {
        if private == [0u8; 32] {
            return Err(IdentityError::ZeroKey);
        }
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .ok_or_else(|| IdentityError::Unavailable("no Curve25519 in snow's resolver".into()))?;
        dh.set(&private);
        let mut public = [0u8; 32];
        public.copy_from_slice(dh.pubkey());
        Ok(Identity { private, public })
    }

    /// Parses 64 hex digits (surrounding whitespace ignored), as written by [`Identity::private_hex`].
    pub fn from_private_hex(text: &str) -> Result<Identity, IdentityError> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return Err(IdentityError::BadHex);
        }
        let mut private = [0u8; 32];
        for (i, byte) in private.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| IdentityError::BadHex)?;
        }
        Identity::from_private(private)
    }

    /// The private key as 64 lowercase hex digits, for a key file.
    pub fn private_hex(&self) -> String {
        self.private.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The name derived from the public key.
    pub fn name(&self) -> PeerName {
        PeerName::from_public_key(&self.public)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("name", &self.name()).field("private", &"<redacted>").finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_rebuild_from_private() {
        let id = Identity::generate();
        let again = Identity::from_private(id.private).unwrap();
        assert_eq!(again, id);
        assert_ne!(Identity::generate().public, id.public);
        assert_eq!(id.name(), PeerName::from_public_key(&id.public));
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let id = Identity::generate();
        let text = format!(" {}\n", id.private_hex());
        assert_eq!(Identity::from_private_hex(&text).unwrap(), id);
        assert_eq!(Identity::from_private_hex("abcd"), Err(IdentityError::BadHex));
        assert_eq!(Identity::from_private_hex(&"zz".repeat(32)), Err(IdentityError::BadHex));
        assert_eq!(Identity::from_private_hex(&"é".repeat(32)), Err(IdentityError::BadHex));
        assert_eq!(Identity::from_private_hex(&"00".repeat(32)), Err(IdentityError::ZeroKey));
    }

    #[test]
    fn matches_rfc7748_test_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let private = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(Identity::from_private(private).unwrap().public, public);
    }

    #[test]
    fn debug_hides_the_private_key() {
        let id = Identity::from_private([7u8; 32]).unwrap();
        let shown = format!("{id:?}");
        assert!(!shown.contains("07, 07"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    fn hex32(s: &str) -> [u8; 32] {
        Identity::from_private_hex(s).unwrap().private
    }
}
