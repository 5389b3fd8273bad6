//! Log set-up: human-readable by default, one JSON object per line on request.
//! Nothing in this crate logs a PIN, a seed, a code or key material; fields carry names,
//! ids, counts and PKCS#11 return values only.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber (stderr). `RUST_LOG` wins over `filter`.
pub fn init(format: LogFormat, filter: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
