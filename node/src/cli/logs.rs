//! Where tracing goes: plain text on stderr, or one JSON object a line with
//! `--log-format json` for log shippers. Under systemd (JOURNAL_STREAM set) the text has
//! no timestamps of its own, since the journal stamps every line.

use std::sync::OnceLock;

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines
    #[default]
    Text,
    /// One JSON object a line: timestamp, level, fields (message and the event's own), target
    Json,
}

/// The global `--log-format`, set once by `main` before any command runs.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

pub(super) fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

pub(super) fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// What a one-shot command logs when neither --log (node run) nor RUST_LOG says: nothing
/// in text, where its stdout and its error line already tell the user everything, and
/// the structured lines (a backup's, a restore's) in JSON, which asked for them.
pub(super) fn command_filter() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| match format() {
        LogFormat::Text => "off".into(),
        LogFormat::Json => "info".into(),
    })
}

/// Installs the subscriber for this process (once; a second call keeps the first).
pub(super) fn init(filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("--log")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format() {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => {
            let builder = builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
            if std::env::var_os("JOURNAL_STREAM").is_some() {
                builder.without_time().try_init()
            } else {
                builder.try_init()
            }
        }
    };
    Ok(())
}

/// The command's error as the last stderr line: in JSON as tracing's json lines are
/// shaped, so that a shipper (or a test) can parse every line of stderr.
pub(super) fn print_error(chain: &str) {
    match format() {
        LogFormat::Text => eprintln!("error: {chain}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "level": "ERROR",
                "fields": { "message": format!("error: {chain}"), "result": "failed" },
                "target": "cairn",
            })
        ),
    }
}
