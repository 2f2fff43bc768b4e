//! Client keys: an `authorization: Bearer KEY` value (gRPC metadata or HTTP
//! header alike), checked against the SHA-256 digests of the config, in
//! constant time; and each key's model allow-list.

use std::{collections::HashSet, sync::Arc};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::CallError;
use crate::config::ApiKeyConfig;

/// The two ways auth fails; front doors may word them for their protocol.
pub const MISSING_KEY: &str = "missing `authorization: Bearer <key>` metadata";
pub const INVALID_KEY: &str = "invalid API key";

struct Key {
    name: Arc<str>,
    digest: [u8; 32],
    /// None: every model.
    models: Option<Arc<HashSet<String>>>,
}

/// Who is calling, once authenticated.
#[derive(Clone)]
pub struct Caller {
    pub key_name: Option<Arc<str>>,
    models: Option<Arc<HashSet<String>>>,
}

impl Caller {
    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

pub struct Keys {
    keys: Vec<Key>,
}

/// A configured key that cannot be used: start-up stops rather than run
/// with a key silently missing (its holder would be locked out, or, were it
/// the only key, auth turned off).
#[derive(Debug, thiserror::Error)]
#[error("api_keys[{index}] ({name:?}): key_sha256 is not the 64 hex digits of a SHA-256")]
pub struct KeyError {
    pub index: usize,
    pub name: String,
}

impl Keys {
    /// The config loader checks the digests too; this check is the one that
    /// holds whatever built the config.
    pub fn new(config: &[ApiKeyConfig]) -> Result<Self, KeyError> {
        let keys = config
            .iter()
            .enumerate()
            .map(|(index, k)| {
                let mut digest = [0u8; 32];
                hex::decode_to_slice(&k.key_sha256, &mut digest)
                    .map_err(|_| KeyError { index, name: k.name.clone() })?;
                let all = k.models.is_empty() || k.models.iter().any(|m| m == "*");
                Ok(Key {
                    name: k.name.as_str().into(),
                    digest,
                    models: (!all).then(|| Arc::new(k.models.iter().cloned().collect())),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Authenticates the call from its `authorization` value, if it sent one.
    /// With no keys configured, auth is off.
    pub fn check(&self, authorization: Option<&str>) -> Result<Caller, CallError> {
        if self.keys.is_empty() {
            return Ok(Caller { key_name: None, models: None });
        }
        let presented = authorization
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or(CallError::Unauthenticated(MISSING_KEY))?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare with every key, so timing does not tell which one is near.
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or(CallError::Unauthenticated(INVALID_KEY))?;
        Ok(Caller { key_name: Some(key.name.clone()), models: key.models.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        let digest = hex::encode(Sha256::digest(b"secret"));
        Keys::new(&[ApiKeyConfig {
            name: "a".into(),
            key_sha256: digest,
            models: vec!["chat".into()],
            limits: Default::default(),
            budget: None,
        }])
        .unwrap()
    }

    #[test]
    fn checks_keys_and_models() {
        let k = keys();
        assert!(matches!(k.check(None), Err(CallError::Unauthenticated(_))));
        assert!(matches!(k.check(Some("Bearer wrong")), Err(CallError::Unauthenticated(_))));
        assert!(matches!(k.check(Some("Basic secret")), Err(CallError::Unauthenticated(_))));
        let c = k.check(Some("bearer  secret ")).unwrap();
        assert_eq!(c.key_name.as_deref(), Some("a"));
        assert!(c.may_use("chat"));
        assert!(!c.may_use("other"));
    }

    #[test]
    fn a_digest_that_does_not_parse_is_an_error_not_a_dropped_key() {
        let good = hex::encode(Sha256::digest(b"secret"));
        for bad in ["", "zz", &good[..62], &format!("{good}00"), &good.replace('2', "g")] {
            let e = Keys::new(&[
                ApiKeyConfig {
                    name: "a".into(),
                    key_sha256: good.clone(),
                    models: vec![],
                    limits: Default::default(),
                    budget: None,
                },
                ApiKeyConfig {
                    name: "b".into(),
                    key_sha256: bad.to_owned(),
                    models: vec![],
                    limits: Default::default(),
                    budget: None,
                },
            ])
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert_eq!((e.index, e.name.as_str()), (1, "b"));
            assert!(e.to_string().contains("api_keys[1]"), "{e}");
        }
    }
}
