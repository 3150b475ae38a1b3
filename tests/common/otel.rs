//! Tracer providers exporting by real OTLP into the testkit receiver.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use mindbus_otel_testkit::OtlpReceiver;
use opentelemetry_otlp::RetryPolicy;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, span_processor_with_async_runtime};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Grpc,
    Http,
}

/// A provider for `service` exporting to `rx` (batch processor).
pub fn provider(service: &str, rx: &OtlpReceiver, proto: Proto) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    match proto {
        Proto::Grpc => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(rx.grpc_endpoint())
                .with_timeout(Duration::from_secs(10))
                .with_retry_policy(RetryPolicy::disabled())
                .build()
                .unwrap();
            SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter)
                .build()
        }
        Proto::Http => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(rx.http_traces_endpoint())
                .with_timeout(Duration::from_secs(10))
                .with_retry_policy(RetryPolicy::disabled())
                .build()
                .unwrap();
            let processor = span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
            SdkTracerProvider::builder()
                .with_resource(resource)
                .with_span_processor(processor)
                .build()
        }
    }
}

/// Flushes providers without blocking the runtime.
pub async fn flush(providers: &[&SdkTracerProvider]) {
    for p in providers {
        let p = (*p).clone();
        tokio::task::spawn_blocking(move || p.force_flush())
            .await
            .unwrap()
            .unwrap();
    }
}

pub async fn shutdown(providers: Vec<SdkTracerProvider>) {
    for p in providers {
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
}
