//! Logging set-up: JSON lines by default (one object per event, with span fields such as the
//! request id), human-readable with `LOG_FORMAT=pretty`. The level comes from `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("info,{service}=info,common=info,sqlx=warn,lapin=warn,tower_http=info"))
    });
    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("pretty"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let result = if pretty {
        // Colours only on a terminal: a log written to a file or a pipe stays plain text.
        builder.with_ansi(std::io::stdout().is_terminal()).try_init()
    } else {
        builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = result;
}
