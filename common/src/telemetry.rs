//! Logs and traces.
//!
//! Logs: JSON lines by default (one object per event, with the fields of the span it
//! happened in, such as the request id and the trace id), human-readable with
//! `LOG_FORMAT=pretty`. The level comes from `RUST_LOG`.
//!
//! Traces: every span is also an OpenTelemetry span (`tracing-opentelemetry`), so each
//! order has one trace: the api's request span starts it (or continues the client's W3C
//! `traceparent`), the purchase message carries it to the worker, the stored order keeps it
//! for the webhook deliveries. The spans that start or continue a trace record its id in a
//! `trace_id` field, so it is in their JSON log lines whether or not traces are exported:
//! `grep <trace id>` over the api's and the worker's logs shows an order's whole path. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, spans are
//! also exported over OTLP/HTTP (protobuf) to that collector, with the other standard
//! `OTEL_EXPORTER_OTLP_*` variables.

use std::collections::HashMap;
use std::io::IsTerminal;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The W3C Trace Context header (and the field name purchase messages carry it under).
pub const TRACEPARENT: &str = "traceparent";

/// Keeps the trace pipeline alive; dropping it flushes the spans not yet exported.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Whether spans are exported (an OTLP collector is configured): work that only exported
/// spans show, such as a batch's links to its orders' traces, is skipped otherwise.
pub fn exporting() -> bool {
    static EXPORTING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EXPORTING.get_or_init(otlp_configured)
}

/// Whether an OTLP collector is configured (the standard variables, non-empty).
fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty()))
}

/// Sets up logging and tracing for a process named `service` (`api`, `worker`). Call once,
/// before the runtime starts; keep the returned value until the process ends.
pub fn init(service: &'static str) -> Telemetry {
    let filter = || {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::new(format!("info,{service}=info,common=info,sqlx=warn,lapin=warn,tower_http=info"))
        })
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(format!("turnstile-{service}")).build();
    let provider = SdkTracerProvider::builder().with_resource(resource);
    let mut export_error = None;
    let exporter = if exporting() {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|err| export_error = Some(err.to_string()))
            .ok()
    } else {
        None
    };
    let provider = match exporter {
        Some(exporter) => provider.with_batch_exporter(exporter),
        // Nothing is exported: spans still get trace and span ids (logged, propagated) but
        // record nothing, so the events and fields they would carry cost nothing.
        None => provider.with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff),
    };
    let provider = provider.build();
    // Traces do not depend on the log level: Turnstile's own spans are always traced (so
    // an order's trace reaches the worker whatever `RUST_LOG` says), nobody else's.
    let traced = tracing_subscriber::filter::Targets::new()
        .with_target("api", tracing::Level::INFO)
        .with_target("worker", tracing::Level::INFO)
        .with_target("common", tracing::Level::INFO);
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(traced);

    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("pretty"));
    let registry = tracing_subscriber::registry().with(traces);
    let result = if pretty {
        // Colours only on a terminal: a log written to a file or a pipe stays plain text.
        let logs = tracing_subscriber::fmt::layer().with_target(true).with_ansi(std::io::stdout().is_terminal());
        registry.with(logs.with_filter(filter())).try_init()
    } else {
        let logs = tracing_subscriber::fmt::layer()
            .json()
            .with_target(true)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false);
        registry.with(logs.with_filter(filter())).try_init()
    };
    // A second initialisation (tests) keeps the first subscriber.
    let _ = result;
    if let Some(err) = export_error {
        tracing::warn!(error = %err, "cannot export traces over OTLP; trace ids are still logged");
    }
    Telemetry { provider }
}

/// The W3C `traceparent` of a span (`00-<trace id>-<span id>-<flags>`, version 00 of the
/// format, as the propagator writes it), if it has a trace. Formatted here rather than
/// through `TraceContextPropagator::inject`, which needs a map per call: this runs once per
/// purchase.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8()))
}

/// The trace context a `traceparent` value names (an empty, invalid one if it names none).
pub fn remote_context(traceparent: &str) -> opentelemetry::Context {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The span context a `traceparent` value names, if it is valid.
pub fn remote_span(traceparent: &str) -> Option<SpanContext> {
    let context = remote_context(traceparent);
    let span = context.span().span_context().clone();
    span.is_valid().then_some(span)
}

/// The trace id (32 hex digits) a `traceparent` value names, if it is valid.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    remote_span(traceparent).map(|span| span.trace_id().to_string())
}

/// Makes `span` continue the trace `parent` names (when valid), then records the span's
/// trace id in its `trace_id` field (which it must declare, as `tracing::field::Empty`).
/// Call before the span is first entered.
pub fn continue_trace(span: &tracing::Span, parent: Option<&str>) {
    if let Some(context) = parent.map(remote_context).filter(|c| c.span().span_context().is_valid()) {
        let _ = span.set_parent(context);
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_written_as_the_propagator_writes_it() {
        let _telemetry = init("test");
        let span = tracing::info_span!(target: "common::test", "probe");
        let written = traceparent(&span).expect("a span has a trace");
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
        assert_eq!(carrier.get(TRACEPARENT), Some(&written));
        assert_eq!(trace_id_of(&written).map(|id| written.contains(&id)), Some(true));
    }

    #[test]
    fn traceparent_values_are_read() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(value).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(remote_span(value).is_some_and(|s| s.is_remote()));
        for bad in ["", "nonsense", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4bf92f35-01"] {
            assert_eq!(trace_id_of(bad), None, "{bad:?}");
        }
    }
}
