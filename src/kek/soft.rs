//! PLACEHOLDER
use super::*;
pub struct SoftProvider;
impl SoftProvider { pub fn open(_d: &std::path::Path, _s: &super::passphrase::PassphraseSource, _n: &str, _v: Option<u32>) -> Result<Self, KekError> { Err(KekError::Io("placeholder".into())) } }
impl KekProvider for SoftProvider { fn uri(&self) -> String { String::new() } fn wrap(&self, _a: &Key32) -> Result<WrappedKey, KekError> { todo!() } fn unwrap(&self, _w: &WrappedKey) -> Result<Key32, KekError> { todo!() } }
