//! W3C trace-context (`traceparent`, `tracestate`) across process boundaries: HTTP headers,
//! gRPC metadata and any string map (NATS headers).
//!
//! The helpers use a [`TraceContextPropagator`] directly rather than the global propagator, so
//! they behave the same in tests that never call [`crate::init`].

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The remote parent carried by HTTP request headers.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `cx` into HTTP headers.
pub fn inject_http(cx: &Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The remote parent carried by gRPC request metadata.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes `cx` into gRPC metadata.
pub fn inject_grpc(cx: &Context, metadata: &mut tonic::metadata::MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// Writes the context of a `tracing` span (its OpenTelemetry side) into gRPC metadata.
pub fn inject_span_grpc(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    inject_grpc(&span.context(), metadata);
}

/// The `traceparent` of a `tracing` span (its OpenTelemetry side), if it is sampled into a
/// trace.
pub fn span_traceparent(span: &tracing::Span) -> Option<String> {
    traceparent(&span.context())
}

/// Makes `span` a child of the remote parent in `cx` (no-op when `cx` has no valid span).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    // An error only means the span is disabled (filtered out): nothing to parent.
    let _ = span.set_parent(cx);
}

/// The remote parent named by a bare `traceparent` value (a NATS header, a stored string);
/// an empty context when the value is not a valid W3C traceparent.
pub fn from_traceparent(traceparent: &str) -> Context {
    let map = std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&map)
}

/// Whether `cx` holds a valid remote or local span to parent or link to.
pub fn is_valid(cx: &Context) -> bool {
    cx.span().span_context().is_valid()
}

/// Adds a link from `span` to the span in `cx` (no-op when `cx` has no valid span).
pub fn add_link(span: &tracing::Span, cx: &Context) {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The `traceparent` value for `cx`, if it holds a valid span.
pub fn traceparent(cx: &Context) -> Option<String> {
    let mut map = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut map);
    map.remove("traceparent")
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt as _;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn http_and_grpc_round_trip_the_traceparent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", PARENT.parse().expect("valid header"));
        let cx = extract_http(&headers);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );

        let mut md = tonic::metadata::MetadataMap::new();
        inject_grpc(&cx, &mut md);
        assert_eq!(
            md.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(PARENT)
        );
        let back = extract_grpc(&md);
        assert_eq!(traceparent(&back).as_deref(), Some(PARENT));

        let mut out = http::HeaderMap::new();
        inject_http(&back, &mut out);
        assert_eq!(
            out.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(PARENT)
        );
    }

    #[test]
    fn a_bare_traceparent_round_trips() {
        let cx = from_traceparent(PARENT);
        assert!(is_valid(&cx));
        assert_eq!(traceparent(&cx).as_deref(), Some(PARENT));
        assert!(!is_valid(&from_traceparent("00-zz-zz-01")));
    }

    #[test]
    fn garbage_traceparent_gives_no_parent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "not-a-trace".parse().expect("valid header"));
        assert!(traceparent(&extract_http(&headers)).is_none());
    }
}
