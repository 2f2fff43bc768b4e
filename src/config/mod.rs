//! The gateway's configuration: one YAML file (CONTRACT.md section 3), or the
//! embedded default. Read by every other module; imports none of them.

mod load;
mod schema;
mod validate;

pub use load::{ConfigError, default_base_url, load_default, load_file, parse, redact_url};
pub use schema::*;
