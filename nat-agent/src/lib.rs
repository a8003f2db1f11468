//! The NAT appliance's agent: config -> validated model -> compiled map contents -> dataplane.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library, so tests drive the same code.

pub mod announce;
pub mod api;
pub mod client;
pub mod compile;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod events;
pub mod gc;
pub mod health;
pub mod import;
pub mod metrics;
pub mod model;
pub mod notify;
mod owner;
pub mod route_watch;
pub mod ruleset;
pub mod sessions;
pub mod status;
pub mod sysctl;

use std::{collections::BTreeMap, path::Path};

/// A config that failed to load, already formatted one problem per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A config file read, validated and compiled.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file as written.
    pub raw: config::ConfigFile,
    /// The validated model.
    pub model: model::Model,
    /// The map contents.
    pub compiled: compile::Compiled,
}

/// Reads, validates and compiles a config file without touching the kernel.
pub fn load_config(path: &Path) -> Result<(model::Model, compile::Compiled), ConfigError> {
    load_config_file(path).map(|l| (l.model, l.compiled))
}

/// [`load_config`], keeping the file as written too.
pub fn load_config_file(path: &Path) -> Result<Loaded, ConfigError> {
    let raw = config::ConfigFile::read(path).map_err(|e| ConfigError(e.to_string()))?;
    compile_raw(&path.display().to_string(), raw)
}

/// Parses, validates and compiles config `text` (TOML as in a config file); `label` names it
/// in errors. For configs that are not files: benchmarks and tests.
pub fn load_config_text(label: &str, text: &str) -> Result<Loaded, ConfigError> {
    let raw = config::ConfigFile::parse(label, text).map_err(|e| ConfigError(e.to_string()))?;
    compile_raw(label, raw)
}

/// Validates and compiles a parsed config, as at start-up (no counter-slot history).
fn compile_raw(file: &str, raw: config::ConfigFile) -> Result<Loaded, ConfigError> {
    let model = model::validate(file, &raw).map_err(|e| ConfigError(e.to_string()))?;
    let compiled = compile::compile(&model, &BTreeMap::new()).map_err(|problems| {
        ConfigError(
            model::ValidationError {
                file: file.to_string(),
                problems,
            }
            .to_string(),
        )
    })?;
    Ok(Loaded {
        raw,
        model,
        compiled,
    })
}
