//! PLACEHOLDER (being replaced by the keystore implementation).
pub fn validate_key_name(name: &str) -> Result<(), String> { if name.is_empty() || name.contains('/') { Err("bad".into()) } else { Ok(()) } }
