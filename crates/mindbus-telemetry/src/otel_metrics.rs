//! A [`metrics`] recorder that records into an OpenTelemetry [`Meter`], so
//! that what the plugin counts through the `metrics` facade can be pushed by
//! OTLP (to a collector that re-exposes it for Prometheus) instead of, or
//! besides, being pulled from our own Prometheus endpoint.
//!
//! The facade's names are kept as they are (they are Prometheus names
//! already: `mindbus_messages_total`, `…_seconds`), so a collector's
//! Prometheus exporter shows the same series names and labels as the pull
//! endpoint and one set of dashboards serves both. No unit is set (an
//! exporter would append it again). How each facade kind maps:
//!
//! | facade | OpenTelemetry | why |
//! |---|---|---|
//! | counter | `u64` counter (monotonic sum) | `absolute` adds the difference |
//! | gauge | observable `f64` gauge, the value kept here | the facade increments and decrements gauges; OpenTelemetry's gauges only take a value |
//! | gauge named `…_total` | observable `f64` counter | an only-increasing fractional total (`ai_team_llm_cost_dollars_total`): a sum, as Prometheus reads the name |
//! | histogram | `f64` histogram, our buckets | [`SECONDS_BUCKETS`] for `…_seconds`, [`QUALITY_SCORE_BUCKETS`] for the quality score |
//!
//! Descriptions given before the first registration of a name are kept.
//! Nothing blocks on the hot path: a counter or histogram record is the
//! SDK's own; a gauge change is an atomic add, read by the export.

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The recorder: see the [module docs](self).
pub(crate) struct OtelRecorder {
    meter: Meter,
    descriptions: Mutex<HashMap<String, SharedString>>,
    counters: Mutex<HashMap<String, opentelemetry::metrics::Counter<u64>>>,
    histograms: Mutex<HashMap<String, opentelemetry::metrics::Histogram<f64>>>,
    /// Per gauge name, its series (attributes and current value), read by
    /// the observable instrument's callback.
    gauges: Mutex<HashMap<String, Series>>,
}

type Series = Arc<Mutex<Vec<(Vec<KeyValue>, Arc<AtomicF64>)>>>;

impl OtelRecorder {
    pub(crate) fn new(meter: Meter) -> OtelRecorder {
        OtelRecorder {
            meter,
            descriptions: Mutex::default(),
            counters: Mutex::default(),
            histograms: Mutex::default(),
            gauges: Mutex::default(),
        }
    }

    fn description(&self, name: &str) -> String {
        self.descriptions
            .lock()
            .ok()
            .and_then(|d| d.get(name).map(|s| s.to_string()))
            .unwrap_or_default()
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        if let Ok(mut d) = self.descriptions.lock() {
            d.entry(key.as_str().to_owned()).or_insert(description);
        }
    }
}

fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels()
        .map(|l| KeyValue::new(l.key().to_owned(), l.value().to_owned()))
        .collect()
}

/// Bucket boundaries for a histogram, as the Prometheus endpoint uses.
fn boundaries(name: &str) -> Option<Vec<f64>> {
    crate::histogram_buckets(name).map(<[f64]>::to_vec)
}

impl Recorder for OtelRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let name = key.name();
        let made = instrument(&self.counters, name, || {
            let description = self.description(name);
            self.meter
                .u64_counter(name.to_owned())
                .with_description(description)
                .build()
        });
        let Some(counter) = made else {
            return Counter::noop();
        };
        Counter::from_arc(Arc::new(OtelCounter {
            counter,
            attributes: attributes(key),
            last_absolute: AtomicU64::new(0),
        }))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let name = key.name().to_owned();
        let value = Arc::new(AtomicF64::default());
        let Ok(mut gauges) = self.gauges.lock() else {
            return Gauge::noop();
        };
        let series = gauges.entry(name.clone()).or_insert_with(|| {
            let series: Series = Arc::default();
            let read = Arc::clone(&series);
            let observe = move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
                if let Ok(series) = read.lock() {
                    for (attributes, value) in series.iter() {
                        observer.observe(value.get(), attributes);
                    }
                }
            };
            let description = self.description(&name);
            if name.ends_with("_total") {
                let _ = self
                    .meter
                    .f64_observable_counter(name.clone())
                    .with_description(description)
                    .with_callback(observe)
                    .build();
            } else {
                let _ = self
                    .meter
                    .f64_observable_gauge(name.clone())
                    .with_description(description)
                    .with_callback(observe)
                    .build();
            }
            series
        });
        if let Ok(mut series) = series.lock() {
            let attributes = attributes(key);
            // The facade may register one series twice: share its value.
            match series.iter().find(|(a, _)| *a == attributes) {
                Some((_, existing)) => return Gauge::from_arc(Arc::clone(existing)),
                None => series.push((attributes, Arc::clone(&value))),
            }
        }
        Gauge::from_arc(value)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let name = key.name();
        let made = instrument(&self.histograms, name, || {
            let builder = self
                .meter
                .f64_histogram(name.to_owned())
                .with_description(self.description(name));
            match boundaries(name) {
                Some(b) => builder.with_boundaries(b).build(),
                None => builder.build(),
            }
        });
        let Some(histogram) = made else {
            return Histogram::noop();
        };
        Histogram::from_arc(Arc::new(OtelHistogram {
            histogram,
            attributes: attributes(key),
        }))
    }
}

/// The instrument named `name`, made on its first registration (the
/// facade registers each series; OpenTelemetry wants one instrument per
/// name). `None` only if the map's lock was poisoned.
fn instrument<T: Clone>(
    map: &Mutex<HashMap<String, T>>,
    name: &str,
    make: impl FnOnce() -> T,
) -> Option<T> {
    let mut map = map.lock().ok()?;
    if let Some(made) = map.get(name) {
        return Some(made.clone());
    }
    let made = make();
    map.insert(name.to_owned(), made.clone());
    Some(made)
}

struct OtelCounter {
    counter: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    last_absolute: AtomicU64,
}

impl CounterFn for OtelCounter {
    fn increment(&self, value: u64) {
        self.counter.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.last_absolute.fetch_max(value, Ordering::Relaxed);
        if value > before {
            self.counter.add(value - before, &self.attributes);
        }
    }
}

struct OtelHistogram {
    histogram: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl HistogramFn for OtelHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value, &self.attributes);
    }
}

/// An `f64` in an atomic, for gauges.
#[derive(Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(f(f64::from_bits(bits)).to_bits())
            });
    }
}

impl GaugeFn for AtomicF64 {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QUALITY_SCORE_BUCKETS, SECONDS_BUCKETS};
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

    /// Records through the facade into an SDK meter provider and returns
    /// what one export carried.
    fn export(record: impl FnOnce()) -> Vec<ResourceMetrics> {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        let recorder = OtelRecorder::new(provider.meter("test"));
        metrics::with_local_recorder(&recorder, record);
        provider.force_flush().unwrap();
        exporter.get_finished_metrics().unwrap()
    }

    /// The data of metric `name` in an export.
    fn data<'a>(export: &'a [ResourceMetrics], name: &str) -> &'a AggregatedMetrics {
        export
            .iter()
            .flat_map(|rm| rm.scope_metrics())
            .flat_map(|sm| sm.metrics())
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no {name} in the export"))
            .data()
    }

    #[test]
    fn each_facade_kind_keeps_its_name_labels_and_meaning() {
        let got = &export(|| {
            metrics::describe_counter!("mindbus_messages_total", "messages");
            let c =
                metrics::counter!("mindbus_messages_total", "agent" => "w", "kind" => "command");
            c.increment(2);
            c.increment(3);
            metrics::counter!("mindbus_messages_total", "agent" => "o", "kind" => "command")
                .increment(1);
            let g = metrics::gauge!("mindbus_messages_in_flight", "agent" => "w");
            g.increment(3.0);
            g.decrement(1.0);
            metrics::gauge!("ai_team_llm_cost_dollars_total", "model" => "gpt-4").increment(0.105);
            metrics::gauge!("ai_team_llm_cost_dollars_total", "model" => "gpt-4").increment(0.105);
            let h = metrics::histogram!("mindbus_processing_duration_seconds", "agent" => "w");
            h.record(0.004);
            h.record(0.2);
            metrics::histogram!("ai_team_quality_score", "agent" => "w").record(8.5);
        });

        let AggregatedMetrics::U64(MetricData::Sum(sum)) = data(got, "mindbus_messages_total")
        else {
            panic!("a u64 sum");
        };
        assert!(sum.is_monotonic());
        let mut points: Vec<(Vec<String>, u64)> = sum
            .data_points()
            .map(|p| {
                let mut labels: Vec<String> = p
                    .attributes()
                    .map(|kv| format!("{}={}", kv.key, kv.value))
                    .collect();
                labels.sort();
                (labels, p.value())
            })
            .collect();
        points.sort();
        assert_eq!(
            points,
            vec![
                (vec!["agent=o".into(), "kind=command".into()], 1),
                (vec!["agent=w".into(), "kind=command".into()], 5),
            ]
        );

        let AggregatedMetrics::F64(MetricData::Gauge(g)) = data(got, "mindbus_messages_in_flight")
        else {
            panic!("an f64 gauge");
        };
        assert_eq!(
            g.data_points().map(|p| p.value()).collect::<Vec<_>>(),
            [2.0]
        );

        let AggregatedMetrics::F64(MetricData::Sum(cost)) =
            data(got, "ai_team_llm_cost_dollars_total")
        else {
            panic!("an f64 sum");
        };
        assert!(cost.is_monotonic());
        let total: f64 = cost.data_points().map(|p| p.value()).sum();
        assert!((total - 0.21).abs() < 1e-9, "{total}");

        let AggregatedMetrics::F64(MetricData::Histogram(h)) =
            data(got, "mindbus_processing_duration_seconds")
        else {
            panic!("an f64 histogram");
        };
        let p = h.data_points().next().unwrap();
        assert_eq!(p.count(), 2);
        assert_eq!(p.bounds().collect::<Vec<_>>(), SECONDS_BUCKETS.to_vec());
        let AggregatedMetrics::F64(MetricData::Histogram(q)) = data(got, "ai_team_quality_score")
        else {
            panic!("an f64 histogram");
        };
        let bounds: Vec<f64> = q.data_points().next().unwrap().bounds().collect();
        assert_eq!(bounds, QUALITY_SCORE_BUCKETS.to_vec());
    }
}
