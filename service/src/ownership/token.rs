//! The one-time credential a frontend hands over to let another process
//! take its device's RID.

use std::io::{self, Read};

/// Bytes in a [`HandoverToken`].
pub const TOKEN_LEN: usize = 16;

/// A random 128-bit secret. The process of a device's vhost-user frontend
/// obtains one from the service (`RID_TOKEN`, [`crate::Client::rid_token`])
/// and passes it to the process it delegates to, whose session redeems it
/// (`RID_CLAIM`). It is good for one redemption, only while the connection
/// that issued it lives, and issuing a new one voids the previous.
#[derive(Clone, PartialEq, Eq)]
pub struct HandoverToken([u8; TOKEN_LEN]);

impl std::fmt::Debug for HandoverToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: never in logs.
        f.write_str("HandoverToken(..)")
    }
}

impl HandoverToken {
    /// A fresh token from the kernel's random source.
    pub fn random() -> io::Result<HandoverToken> {
        let mut b = [0u8; TOKEN_LEN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(HandoverToken(b))
    }

    /// The token as it travels.
    pub fn from_bytes(b: [u8; TOKEN_LEN]) -> HandoverToken {
        HandoverToken(b)
    }

    /// The token's bytes.
    pub fn bytes(&self) -> [u8; TOKEN_LEN] {
        self.0
    }

    /// Compares without an early exit, so the time taken says nothing
    /// about how many leading bytes a guess got right.
    pub fn matches(&self, other: &[u8; TOKEN_LEN]) -> bool {
        self.0
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_tokens_differ_and_match_only_themselves() {
        let a = HandoverToken::random().expect("random");
        let b = HandoverToken::random().expect("random");
        assert_ne!(a, b);
        assert!(a.matches(&a.bytes()));
        let mut near = a.bytes();
        near[TOKEN_LEN - 1] ^= 1;
        assert!(!a.matches(&near));
        assert_eq!(format!("{a:?}"), "HandoverToken(..)");
    }
}
