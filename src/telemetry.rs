//! Logging setup: `tracing` with text or JSON output, filtered by `--log-level` or `RUST_LOG`.

use clap::ValueEnum;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Parse a filter such as `info` or `warn,lunanode_csi=debug`. `None` when it is not valid.
///
/// `Targets` rather than `EnvFilter`: target/level directives are all an operator needs here,
/// and `EnvFilter` brings a regex engine that alone is ~4% of the binary's code.
pub fn parse_filter(spec: &str) -> Option<Targets> {
    spec.trim().parse().ok()
}

/// Install the global subscriber. `RUST_LOG` wins over `level` so operators can turn on
/// per-module detail without a new flag. Logs go to stderr so stdout stays machine-readable
/// (`sim` prints its start-up JSON there).
pub fn init(format: LogFormat, level: &str) {
    let env = std::env::var("RUST_LOG").ok();
    let filter = env
        .as_deref()
        .and_then(parse_filter)
        .or_else(|| parse_filter(level))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // Colour only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    // A second init (tests, demo inside a test) is harmless: keep the first subscriber.
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn levels_and_per_module_directives_parse() {
        let f = parse_filter("warn,lunanode_csi::lunanode=debug").unwrap();
        assert!(f.would_enable("lunanode_csi::lunanode::client", &Level::DEBUG));
        assert!(!f.would_enable("lunanode_csi::driver", &Level::INFO));
        assert!(f.would_enable("hyper", &Level::WARN));
        let f = parse_filter(" info ").unwrap();
        assert!(f.would_enable("anything", &Level::INFO));
        assert!(!f.would_enable("anything", &Level::DEBUG));
    }

    #[test]
    fn nonsense_is_refused_so_the_default_applies() {
        assert!(parse_filter("lunanode_csi=loud").is_none());
    }
}
