//! `--otlp-url`: the aggregates pushed after each poll as OTLP/HTTP metrics
//! (an `ExportMetricsServiceRequest`, protobuf, gzip), cumulative, with the
//! OpenTelemetry names of `super::prom::SERIES`.
//!
//! A thread of its own pushes, so a slow collector never holds up a poll:
//! the poller only wakes it, and it sends the newest publication (the
//! series are cumulative, so one skipped while a push was in flight loses
//! nothing). A push that fails for a reason that may pass (no connection,
//! a timeout, 429, 502, 503, 504) is tried [`ATTEMPTS`] times in all, a
//! second apart and then two, or at once when a newer publication comes;
//! every outcome is counted.
//!
//! The messages are declared here with prost's derive, field numbers as in
//! `opentelemetry/proto/collector/metrics/v1/metrics_service.proto` and
//! `metrics/v1/metrics.proto` (OTLP 1.x); the tests decode them with the
//! official definitions.

use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use flate2::write::GzEncoder;
use flate2::Compression;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use prometheus::{IntCounter, IntCounterVec};
use prost::Message;

use super::prom::{label_values, states_seen, Reading, SERIES};
use super::{Aggregates, Snapshot};
use crate::identity::Identity;
use std::sync::Arc;

/// Tries of one push, the first included.
pub const ATTEMPTS: u32 = 3;

#[derive(Clone, PartialEq, Message)]
pub struct ExportMetricsServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_metrics: Vec<ResourceMetrics>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExportMetricsServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportMetricsPartialSuccess>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExportMetricsPartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_data_points: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResourceMetrics {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_metrics: Vec<ScopeMetrics>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ScopeMetrics {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
}

#[derive(Clone, PartialEq, Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Metric {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub description: String,
    #[prost(string, tag = "3")]
    pub unit: String,
    #[prost(oneof = "Data", tags = "7, 9")]
    pub data: Option<Data>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Data {
    #[prost(message, tag = "7")]
    Sum(Sum),
    #[prost(message, tag = "9")]
    Histogram(Histogram),
}

/// `AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE`.
const CUMULATIVE: i32 = 2;

#[derive(Clone, PartialEq, Message)]
pub struct Sum {
    #[prost(message, repeated, tag = "1")]
    pub data_points: Vec<NumberDataPoint>,
    #[prost(int32, tag = "2")]
    pub aggregation_temporality: i32,
    #[prost(bool, tag = "3")]
    pub is_monotonic: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    #[prost(message, repeated, tag = "1")]
    pub data_points: Vec<HistogramDataPoint>,
    #[prost(int32, tag = "2")]
    pub aggregation_temporality: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct NumberDataPoint {
    #[prost(message, repeated, tag = "7")]
    pub attributes: Vec<KeyValue>,
    #[prost(fixed64, tag = "2")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "3")]
    pub time_unix_nano: u64,
    #[prost(oneof = "Number", tags = "4, 6")]
    pub value: Option<Number>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Number {
    #[prost(double, tag = "4")]
    AsDouble(f64),
    #[prost(sfixed64, tag = "6")]
    AsInt(i64),
}

#[derive(Clone, PartialEq, Message)]
pub struct HistogramDataPoint {
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(fixed64, tag = "2")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "3")]
    pub time_unix_nano: u64,
    #[prost(fixed64, tag = "4")]
    pub count: u64,
    #[prost(double, optional, tag = "5")]
    pub sum: Option<f64>,
    #[prost(fixed64, repeated, tag = "6")]
    pub bucket_counts: Vec<u64>,
    #[prost(double, repeated, tag = "7")]
    pub explicit_bounds: Vec<f64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    StringValue(String),
    #[prost(int64, tag = "3")]
    IntValue(i64),
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value)),
        }),
    }
}

/// `network.connection.state` as OpenTelemetry's semantic conventions spell
/// a `--states` name.
fn semconv_state(name: &str) -> String {
    match name {
        "syn-recv" => "syn_received".into(),
        other => other.replace('-', "_"),
    }
}

/// A group's attributes: `xtcp.service`, `xtcp.side`, `server.port` (the
/// listening port, or the service port a client connects to; absent for
/// ephemeral ports and the folded group) and `xtcp.network`.
fn attributes(labels: &super::GroupLabels, networks: &[&str]) -> Vec<KeyValue> {
    let mut out = Vec::new();
    for (name, value) in label_values(labels, networks) {
        match name {
            "port" => {
                if let Ok(port) = value.parse::<i64>() {
                    out.push(int("server.port", port));
                }
            }
            other => out.push(string(&format!("xtcp.{other}"), &value)),
        }
    }
    out
}

/// The request for a snapshot.
pub fn request(
    snapshot: &Snapshot,
    networks: &[&str],
    identity: &Identity,
) -> ExportMetricsServiceRequest {
    let time = snapshot.time_ns;
    // Each group's attributes, made once for all its series.
    let groups: Vec<_> = snapshot
        .groups
        .iter()
        .map(|(labels, group)| (attributes(labels, networks), group))
        .collect();
    let mut metrics = Vec::new();
    for s in &SERIES {
        let mut numbers = Vec::new();
        let mut histograms = Vec::new();
        for (group_attributes, group) in &groups {
            let attrs = group_attributes.clone();
            let point = |mut attributes: Vec<KeyValue>, value| {
                attributes.extend(s.otel_attributes.iter().map(|(k, v)| string(k, v)));
                NumberDataPoint {
                    attributes,
                    start_time_unix_nano: group.start_ns,
                    time_unix_nano: time,
                    value: Some(value),
                }
            };
            match s.reading {
                Reading::Connections => {
                    for (state, n) in states_seen(group) {
                        let mut a = attrs.clone();
                        a.push(string("network.transport", "tcp"));
                        a.push(string("network.connection.state", &semconv_state(state)));
                        numbers.push(point(a, Number::AsInt(n as i64)));
                    }
                }
                Reading::Counter(read, scale) => {
                    let value = if scale == 1.0 {
                        Number::AsInt(read(group) as i64)
                    } else {
                        Number::AsDouble(read(group) as f64 * scale)
                    };
                    numbers.push(point(attrs, value));
                }
                Reading::Histogram(read, bounds) => {
                    let h = read(group);
                    histograms.push(HistogramDataPoint {
                        attributes: attrs,
                        start_time_unix_nano: group.start_ns,
                        time_unix_nano: time,
                        count: h.count(),
                        sum: Some(h.sum),
                        bucket_counts: h.counts[..=bounds.len()].to_vec(),
                        explicit_bounds: bounds.to_vec(),
                    });
                }
            }
        }
        // A metric without points (no group yet) is left out: collectors
        // may refuse it.
        if numbers.is_empty() && histograms.is_empty() {
            continue;
        }
        let data = match s.reading {
            Reading::Histogram(..) => Data::Histogram(Histogram {
                data_points: histograms,
                aggregation_temporality: CUMULATIVE,
            }),
            // Connections by state go up and down (an UpDownCounter).
            Reading::Connections => Data::Sum(Sum {
                data_points: numbers,
                aggregation_temporality: CUMULATIVE,
                is_monotonic: false,
            }),
            Reading::Counter(..) => Data::Sum(Sum {
                data_points: numbers,
                aggregation_temporality: CUMULATIVE,
                is_monotonic: true,
            }),
        };
        metrics.push(Metric {
            name: s.otel.into(),
            description: s.prom.help.into(),
            unit: s.unit.into(),
            data: Some(data),
        });
    }
    // The two directions of system.network.io are one metric.
    merge_same_names(&mut metrics);
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "xtcp"),
                    string("service.version", env!("CARGO_PKG_VERSION")),
                    string("host.name", &identity.hostname),
                    string("service.instance.id", &identity.instance.to_string()),
                ],
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "xtcp".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                metrics,
            }],
        }],
    }
}

/// Joins the points of metrics that share a name (kept in first-seen
/// order); they share their kind by construction.
fn merge_same_names(metrics: &mut Vec<Metric>) {
    let mut merged: Vec<Metric> = Vec::new();
    for m in metrics.drain(..) {
        match merged.iter_mut().find(|x| x.name == m.name) {
            Some(Metric {
                data: Some(Data::Sum(into)),
                ..
            }) => {
                if let Some(Data::Sum(from)) = m.data {
                    into.data_points.extend(from.data_points);
                }
            }
            _ => merged.push(m),
        }
    }
    *metrics = merged;
}

/// What the pusher counts.
#[derive(Clone)]
pub struct OtlpMetrics {
    /// By result: `delivered`, `failed`.
    pub exports: IntCounterVec,
    pub retries: IntCounter,
    pub rejected_points: IntCounter,
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub url: Uri,
    pub timeout: Duration,
}

/// Checks `--otlp-url`: an `http://` URL with a host (TLS is left to a
/// local collector).
pub fn parse_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s.parse().map_err(|e| format!("'{s}': {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "'{s}': only http:// URLs (send to a local collector, which may forward over TLS)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("'{s}': no host"));
    }
    Ok(uri)
}

/// The pushing thread's side: woken after each publication.
pub struct Pusher {
    config: OtlpConfig,
    aggregates: Arc<Aggregates>,
    identity: Identity,
    metrics: OtlpMetrics,
    wake: Receiver<()>,
}

/// The poller's side: wakes the pusher; dropping it ends the thread after
/// the push in flight.
pub struct PushHandle(Sender<()>);

impl PushHandle {
    pub fn wake(&self) {
        // A wake already waiting will send the newest publication anyway.
        let _ = self.0.try_send(());
    }
}

impl Pusher {
    pub fn new(
        config: OtlpConfig,
        aggregates: Arc<Aggregates>,
        identity: Identity,
        metrics: OtlpMetrics,
    ) -> (Pusher, PushHandle) {
        let (tx, wake) = bounded(1);
        let pusher = Pusher {
            config,
            aggregates,
            identity,
            metrics,
            wake,
        };
        (pusher, PushHandle(tx))
    }

    /// Pushes after each wake until the handle is dropped; the last
    /// publication is pushed before it returns.
    pub fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                xtcp_service::say!("xtcp: warning: --otlp-url: no runtime for pushes: {e}");
                return;
            }
        };
        let mut said = false;
        while self.wake.recv().is_ok() {
            if let Err(e) = runtime.block_on(self.push()) {
                self.metrics.exports.with_label_values(&["failed"]).inc();
                if !said {
                    xtcp_service::say!(
                        "xtcp: warning: pushing metrics to {}: {e} (counted in \
                         xtcp_otlp_exports_total{{result=\"failed\"}}; said once)",
                        self.config.url
                    );
                    said = true;
                }
            } else {
                self.metrics.exports.with_label_values(&["delivered"]).inc();
            }
        }
    }

    /// One push, tried again up to [`ATTEMPTS`] times while that may help.
    /// Each try sends the newest publication: one made meanwhile replaces
    /// the one that failed (the series are running totals), and is tried
    /// at once; a stop ends the tries.
    async fn push(&self) -> Result<(), String> {
        let mut attempt = 1;
        loop {
            let (e, retryable) = match self.post(self.body()?).await {
                Ok(()) => return Ok(()),
                Err(failed) => failed,
            };
            if !retryable || attempt == ATTEMPTS {
                return Err(e);
            }
            let pause = Duration::from_secs(u64::from(attempt));
            if let Err(RecvTimeoutError::Disconnected) = self.wake.recv_timeout(pause) {
                return Err(e);
            }
            self.metrics.retries.inc();
            attempt += 1;
        }
    }

    /// The newest publication, encoded and compressed.
    fn body(&self) -> Result<Bytes, String> {
        let networks = self.aggregates.network_names();
        let snapshot = self.aggregates.snapshot();
        let body = request(&snapshot, &networks, &self.identity).encode_to_vec();
        let mut gz = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
        gz.write_all(&body)
            .and_then(|()| gz.finish())
            .map(Bytes::from)
            .map_err(|e| format!("compressing: {e}"))
    }

    /// One POST; the error says whether trying again may help.
    async fn post(&self, body: Bytes) -> Result<(), (String, bool)> {
        let uri = &self.config.url;
        let request = async {
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(80);
            let stream = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|e| (format!("connecting: {e}"), true))?;
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| (format!("HTTP: {e}"), true))?;
            tokio::spawn(connection);
            let authority = uri.authority().map_or(host.to_string(), |a| a.to_string());
            // The origin form (`/v1/metrics`): the absolute one is for proxies.
            let target = uri.path_and_query().map_or("/", |p| p.as_str());
            let request = hyper::Request::post(target)
                .header(hyper::header::HOST, authority)
                .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
                .header(hyper::header::CONTENT_ENCODING, "gzip")
                .body(Full::new(body))
                .map_err(|e| (format!("HTTP: {e}"), false))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| (format!("HTTP: {e}"), true))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| (format!("reading the answer: {e}"), true))?
                .to_bytes();
            Ok::<_, (String, bool)>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.config.timeout, request)
            .await
            .map_err(|_| {
                (
                    format!(
                        "no answer in {}",
                        humantime::format_duration(self.config.timeout)
                    ),
                    true,
                )
            })??;
        if status.is_success() {
            // A collector that took only part says how many points it refused.
            if let Ok(answer) = ExportMetricsServiceResponse::decode(body) {
                if let Some(partial) = answer.partial_success {
                    let rejected = partial.rejected_data_points.max(0) as u64;
                    self.metrics.rejected_points.inc_by(rejected);
                }
            }
            return Ok(());
        }
        let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
        Err((format!("the collector answered {status}"), retryable))
    }
}
