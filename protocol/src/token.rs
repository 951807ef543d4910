//! Invite tokens: what one partner consultant sends another to start trusting each other.
//! A token is signed by the inviting site, expires, and carries a random id so each can be
//! used once. It travels as text: `cairn-invite-` and the base32 of its encoding.
//!
//! Token format, version 1:
//!
//! ```text
//! u8 TOKEN_VERSION | [32] inviter site id | u16 + name | addresses (u8 count, u16 + each)
//! | u64 quota offered (bytes the inviter will store for the accepter) | u64 expires (unix ms)
//! | [16] token id | [64] ed25519 signature over TOKEN_CONTEXT + all of the above
//! ```
//!
//! As text, whitespace anywhere (a mail client's line wrap) and case are ignored. A later
//! version keeps the prefix, the version byte first and, like every signed token, at least
//! a site id and a signature ([`TOKEN_BYTES_MIN`]); a text that has our prefix but not that
//! framing, or a version byte far past ours, is "not a cairn token" rather than a token
//! from a newer build, so garbage does not advise an upgrade.

use ed25519_dalek::SigningKey;
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::humanid;
use crate::identity::{sign, SiteId};
use crate::record::{get_addresses, get_name, put_addresses, put_name};

pub const TOKEN_VERSION: u8 = 1;
pub const INVITE_PREFIX: &str = "cairn-invite-";
const TOKEN_CONTEXT: &[u8] = b"cairn 2026-11 invite v1\0";
/// The shortest any version of a token can be: its version byte, a site id, a signature.
pub const TOKEN_BYTES_MIN: usize = 1 + 32 + 64;
/// How far past the version this build reads a token's version byte may be and still be
/// taken for a newer token: versions come one at a time, a garbage byte lands anywhere.
const TOKEN_VERSIONS_AHEAD_MAX: u8 = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a cairn invite token (it should start with {INVITE_PREFIX})")]
    NotAnInvite,
    #[error(
        "not a cairn token: what follows {INVITE_PREFIX} is no invite; copy the whole token again"
    )]
    NotAToken,
    #[error("invite token is damaged or truncated")]
    Decode(#[from] DecodeError),
    #[error("invite token signature does not verify: it was altered or forged")]
    BadSignature,
    #[error("invite token expired {0} minutes ago; ask for a new one")]
    Expired(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteToken {
    pub inviter: SiteId,
    pub inviter_name: String,
    pub addresses: Vec<String>,
    pub quota_bytes: u64,
    pub expires_unix_ms: u64,
    pub token_id: [u8; 16],
    pub signature: [u8; 64],
}

impl InviteToken {
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        site_key: &SigningKey,
        inviter_name: &str,
        addresses: Vec<String>,
        quota_bytes: u64,
        expires_unix_ms: u64,
        token_id: [u8; 16],
    ) -> InviteToken {
        let mut token = InviteToken {
            inviter: SiteId(site_key.verifying_key().to_bytes()),
            inviter_name: inviter_name.to_owned(),
            addresses,
            quota_bytes,
            expires_unix_ms,
            token_id,
            signature: [0; 64],
        };
        token.signature = sign(site_key, TOKEN_CONTEXT, &token.unsigned().finish());
        token
    }

    fn unsigned(&self) -> Writer {
        let mut w = Writer::default();
        w.u8(TOKEN_VERSION);
        w.array(&self.inviter.0);
        put_name(&mut w, &self.inviter_name);
        put_addresses(&mut w, &self.addresses);
        w.u64(self.quota_bytes);
        w.u64(self.expires_unix_ms);
        w.array(&self.token_id);
        w
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = self.unsigned();
        w.array(&self.signature);
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> Result<InviteToken, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("invite token", TOKEN_VERSION)?;
        let inviter = SiteId(r.array()?);
        let inviter_name = get_name(&mut r, "site name")?;
        let addresses = get_addresses(&mut r)?;
        let quota_bytes = r.u64()?;
        let expires_unix_ms = r.u64()?;
        let token_id = r.array()?;
        let signature = r.array()?;
        r.finish()?;
        Ok(InviteToken {
            inviter,
            inviter_name,
            addresses,
            quota_bytes,
            expires_unix_ms,
            token_id,
            signature,
        })
    }

    /// The token as text to paste into a mail or chat.
    pub fn to_text(&self) -> String {
        to_text(INVITE_PREFIX, &self.encode())
    }

    /// Parses and checks a token: its form, its signature, and that it has not expired.
    pub fn from_text(text: &str, now_unix_ms: u64) -> Result<InviteToken, TokenError> {
        let bytes =
            from_text(INVITE_PREFIX, "invite token", TOKEN_VERSION, text).map_err(|error| {
                match error {
                    TextError::NoPrefix => TokenError::NotAnInvite,
                    TextError::NotAToken => TokenError::NotAToken,
                    TextError::Decode(error) => TokenError::Decode(error),
                }
            })?;
        let token = InviteToken::decode(&bytes)?;
        if !token
            .inviter
            .verifies(TOKEN_CONTEXT, &token.unsigned().finish(), &token.signature)
        {
            return Err(TokenError::BadSignature);
        }
        if now_unix_ms > token.expires_unix_ms {
            return Err(TokenError::Expired(
                (now_unix_ms - token.expires_unix_ms) / 60_000,
            ));
        }
        Ok(token)
    }
}

/// A token as text: `prefix` and the lower-case base32 of its bytes, to paste into a mail
/// or chat. The token's own signature guards it, so there are no check characters.
pub(crate) fn to_text(prefix: &str, bytes: &[u8]) -> String {
    let body = String::from_utf8(humanid::base32(bytes)).expect("base32 is ASCII");
    format!("{prefix}{}", body.to_lowercase())
}

/// Why a text is not a token's bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TextError {
    /// It does not start with the prefix: some other kind of text.
    NoPrefix,
    /// It has the prefix, but what follows is not the framing of any version of a token.
    NotAToken,
    /// It is a token, damaged, cut short, or from a newer build.
    Decode(DecodeError),
}

/// The bytes of a token's text: whitespace anywhere (as mail wraps it) and case ignored.
/// A version byte other than `version` counts as a newer token only when it is at most a
/// few versions ahead and the bytes are long enough to hold a site id and a signature.
pub(crate) fn from_text(
    prefix: &str,
    what: &'static str,
    version: u8,
    text: &str,
) -> Result<Vec<u8>, TextError> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let body = match text.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => &text[prefix.len()..],
        _ => return Err(TextError::NoPrefix),
    };
    let bytes = humanid::unbase32_vec(what, body.as_bytes()).map_err(TextError::Decode)?;
    match bytes.first() {
        Some(&first) if first == version => Ok(bytes),
        Some(&first)
            if first > version
                && first - version <= TOKEN_VERSIONS_AHEAD_MAX
                && bytes.len() >= TOKEN_BYTES_MIN =>
        {
            Err(TextError::Decode(DecodeError::UnsupportedVersion {
                what,
                version: first,
                supported: version,
            }))
        }
        // Empty: a token cut right after its prefix.
        None => Err(TextError::Decode(DecodeError::Truncated { needed: 1 })),
        Some(_) => Err(TextError::NotAToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token() -> InviteToken {
        InviteToken::sign(
            &SigningKey::from_bytes(&[3; 32]),
            "Jones IT, Harbour Rd",
            vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
            500_000_000_000,
            2_000_000,
            [8; 16],
        )
    }

    #[test]
    fn tokens_round_trip_as_text() {
        let token = token();
        assert_eq!(
            InviteToken::from_text(&token.to_text(), 1_000_000).unwrap(),
            token
        );
        assert_eq!(
            InviteToken::from_text(&format!("  {}\n", token.to_text()), 1_000_000).unwrap(),
            token
        );
    }

    #[test]
    fn expired_truncated_and_foreign_tokens_are_refused() {
        let text = token().to_text();
        assert_eq!(
            InviteToken::from_text(&text, 2_000_000 + 3 * 60_000),
            Err(TokenError::Expired(3))
        );
        assert!(matches!(
            InviteToken::from_text(&text[..text.len() - 5], 0),
            Err(TokenError::Decode(_))
        ));
        assert_eq!(
            InviteToken::from_text("cairn-join-abc", 0),
            Err(TokenError::NotAnInvite)
        );
    }

    #[test]
    fn tokens_wrapped_by_mail_or_upper_cased_are_read() {
        let token = token();
        let text = token.to_text();
        let (head, tail) = text.split_at(40);
        for pasted in [
            format!("{head}\n{tail}"),
            format!("{head}\r\n  {tail}\n"),
            format!("{head} {tail}"),
            text.to_uppercase(),
            format!("{}\n{}", head.to_uppercase(), tail),
        ] {
            assert_eq!(
                InviteToken::from_text(&pasted, 1_000_000),
                Ok(token.clone()),
                "{pasted:?}"
            );
        }
    }

    #[test]
    fn garbage_is_not_a_cairn_token_and_a_newer_token_says_so() {
        // Garbage after the prefix whose first byte is 7: once "unsupported version 7".
        let garbage = to_text(INVITE_PREFIX, &[7, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            InviteToken::from_text(&garbage, 0),
            Err(TokenError::NotAToken)
        );
        assert_eq!(
            TokenError::NotAToken.to_string(),
            "not a cairn token: what follows cairn-invite- is no invite; copy the whole token again"
        );
        let far_ahead = to_text(INVITE_PREFIX, &[200; TOKEN_BYTES_MIN]);
        assert_eq!(
            InviteToken::from_text(&far_ahead, 0),
            Err(TokenError::NotAToken)
        );
        assert_eq!(
            InviteToken::from_text("hello there", 0),
            Err(TokenError::NotAnInvite)
        );
        // A token of the next version, long enough to be signed: a newer build's.
        let mut newer = token().encode();
        newer[0] = TOKEN_VERSION + 1;
        assert!(matches!(
            InviteToken::from_text(&to_text(INVITE_PREFIX, &newer), 0),
            Err(TokenError::Decode(DecodeError::UnsupportedVersion {
                version: 2,
                ..
            }))
        ));
    }

    proptest! {
        #[test]
        fn any_flipped_bit_is_refused(bit: usize) {
            let mut bytes = token().encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let text = to_text(INVITE_PREFIX, &bytes);
            prop_assert!(InviteToken::from_text(&text, 1_000_000).is_err());
        }

        #[test]
        fn parsing_never_panics(text in "cairn-invite-[a-z2-7]{0,300}") {
            let _ = InviteToken::from_text(&text, 0);
        }
    }
}
