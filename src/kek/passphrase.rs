//! PLACEHOLDER
#[derive(Debug, Clone)] pub enum PassphraseSource { File(std::path::PathBuf), Env(String), Prompt, Auto }
