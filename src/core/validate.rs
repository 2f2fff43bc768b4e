//! The checks every front door makes on a request's values, whatever its wire
//! format: ranges, counts and sizes, each error naming the field. A front
//! door calls them while it translates its request, in its fields' order, and
//! keeps to itself only what is about its own shapes (enums, JSON text).

use std::collections::{HashMap, HashSet};

use super::error::CallError;

pub const MAX_STOP: usize = 4;
/// OpenAI's own limit; a caller cannot make validation cost without bound.
pub const MAX_TOOLS: usize = 128;
pub const MAX_METADATA: usize = 64;
pub const MAX_METADATA_KEY: usize = 128;
pub const MAX_METADATA_VALUE: usize = 512;
const MAX_TOOL_NAME: usize = 64;

pub fn messages(count: usize) -> Result<(), CallError> {
    if count == 0 {
        return Err(CallError::invalid("messages", "at least one message is required"));
    }
    Ok(())
}

/// `max_tokens` (named `field` by the caller's protocol), `temperature`,
/// `top_p` and `stop`.
pub fn sampling(
    max_tokens: Option<u32>,
    max_tokens_field: &str,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: &[String],
) -> Result<(), CallError> {
    if max_tokens == Some(0) {
        return Err(CallError::invalid(max_tokens_field, "must be at least 1"));
    }
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(CallError::invalid("temperature", format!("{t} is out of range 0..2")));
    }
    if let Some(t) = top_p
        && !(0.0..=1.0).contains(&t)
    {
        return Err(CallError::invalid("top_p", format!("{t} is out of range 0..1")));
    }
    if stop.len() > MAX_STOP {
        return Err(CallError::invalid("stop", format!("at most {MAX_STOP} sequences, got {}", stop.len())));
    }
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(CallError::invalid(format!("stop[{i}]"), "must not be empty"));
    }
    Ok(())
}

/// The caller's tags: a bounded number of bounded strings.
pub fn metadata(m: &HashMap<String, String>) -> Result<(), CallError> {
    if m.len() > MAX_METADATA {
        return Err(CallError::invalid("metadata", format!("at most {MAX_METADATA} entries")));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY {
            return Err(CallError::invalid("metadata", format!("keys are 1..{MAX_METADATA_KEY} bytes")));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(CallError::invalid(
                format!("metadata[{k:?}]"),
                format!("values are at most {MAX_METADATA_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

pub fn tools(count: usize) -> Result<(), CallError> {
    if count > MAX_TOOLS {
        return Err(CallError::invalid("tools", format!("at most {MAX_TOOLS} tools, got {count}")));
    }
    Ok(())
}

/// A tool's name: unique among the tools seen so far, and one that every
/// provider accepts. The error's message, for the caller's field name.
pub fn tool_name(name: &str, seen: &mut HashSet<String>) -> Result<(), &'static str> {
    if !seen.insert(name.to_owned()) {
        return Err("names a tool twice");
    }
    let valid = !name.is_empty()
        && name.len() <= MAX_TOOL_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err("must be 1-64 characters of a-z, A-Z, 0-9, _ and -");
    }
    Ok(())
}

/// A JSON text that must hold an object (a JSON Schema, say); the message
/// of the error, for the caller's field name.
pub fn json_object(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<(), CallError>) -> String {
        match r {
            Err(CallError::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid input, got {other:?}"),
        }
    }

    #[test]
    fn names_the_field() {
        assert!(sampling(Some(1), "max_tokens", Some(2.0), Some(1.0), &["x".into()]).is_ok());
        assert_eq!(
            field(sampling(Some(0), "max_completion_tokens", None, None, &[])),
            "max_completion_tokens"
        );
        assert_eq!(field(sampling(None, "max_tokens", Some(f32::NAN), None, &[])), "temperature");
        assert_eq!(field(sampling(None, "max_tokens", None, None, &["a".into(), String::new()])), "stop[1]");
        let mut seen = HashSet::new();
        assert!(tool_name("f", &mut seen).is_ok());
        assert_eq!(tool_name("f", &mut seen), Err("names a tool twice"));
        assert!(tool_name("a b", &mut seen).is_err());
        assert!(json_object("[]").is_err());
    }
}
