//! Traces end to end: the real binary exports over OTLP/gRPC to a collector
//! this test runs; the span tree, its parentage and GenAI attributes, and the
//! `traceparent` the upstream received are checked against the caller's trace.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use llm_gateway::api::pb;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::{Request, Response, Status};

use crate::{
    harness::{Binary, WAIT, connect, parse_traceparent, stream_call, stream_request, within},
    upstream::{Reply, Step, Upstream},
    wire::openai,
};

/// An OTLP trace collector: keeps every span it is sent.
pub(crate) struct Collector {
    addr: SocketAddr,
    spans: watch::Receiver<Vec<Span>>,
    server: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Sink(Arc<watch::Sender<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: Vec<Span> = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect();
        self.0.send_modify(|all| all.extend(spans));
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
        let addr = listener.local_addr().expect("collector address");
        let (tx, spans) = watch::channel(Vec::new());
        let sink = Sink(Arc::new(tx));
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self { addr, spans, server }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub(crate) fn all(&self) -> Vec<Span> {
        self.spans.borrow().clone()
    }

    /// Waits until a span matching `pred` has arrived.
    async fn span(&self, what: &str, pred: impl Fn(&Span) -> bool) -> Span {
        let mut rx = self.spans.clone();
        let seen = within(WAIT, what, rx.wait_for(|spans| spans.iter().any(&pred))).await.expect("collector");
        seen.iter().find(|s| pred(s)).cloned().expect("just seen")
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn attr_str<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("span {:?}: attribute {key} is {other:?}", span.name),
    }
}

fn attr_int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("span {:?}: attribute {key} is {other:?}", span.name),
    }
}

fn gateway_yaml(base_url: &str) -> String {
    format!(
        "\
providers:
  oa:
    kind: openai
    base_url: {base_url}
models:
  chat:
    targets: [{{ provider: oa, model: gpt-4o-mini }}]
"
    )
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

async fn traced_gateway(upstream: &Upstream, collector: &Collector) -> Binary {
    let endpoint = collector.endpoint();
    Binary::start(
        &gateway_yaml(&upstream.base_url()),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SERVICE_NAME", "llm-gateway-test"),
        ],
    )
    .await
}

fn traced(mut request: pb::StreamCompletionRequest) -> Request<pb::StreamCompletionRequest> {
    request.metadata.insert("team".into(), "search".into());
    request.max_tokens = Some(64);
    request.temperature = Some(0.5);
    let mut request = Request::new(request);
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().expect("header"));
    request
}

#[tokio::test]
async fn streamed_call_exports_its_span_tree_under_the_callers_trace() {
    let collector = Collector::start().await;
    let upstream = Upstream::start(Reply::events(&openai::answer(
        "c1",
        "gpt-4o-mini-2024",
        &["Hel", "lo"],
        "stop",
        7,
        2,
    )))
    .await;
    let gw = traced_gateway(&upstream, &collector).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(gw.grpc).await);
    let answer = stream_call(&mut client, traced(stream_request("chat", "hi"))).await;
    answer.end.as_ref().expect("the stream ends OK");
    assert_eq!(answer.text(), "Hello");

    let server =
        collector.span("the server span", |s| s.name == "llmgateway.v1.LlmGateway/StreamCompletion").await;
    assert_eq!(hex(&server.trace_id), TRACE_ID, "the server span is in the caller's trace");
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN, "the server span is the caller's child");
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr_str(&server, "rpc.system"), "grpc");
    assert_eq!(attr_str(&server, "rpc.service"), "llmgateway.v1.LlmGateway");
    assert_eq!(attr_str(&server, "rpc.method"), "StreamCompletion");
    assert_eq!(attr_int(&server, "rpc.grpc.status_code"), 0);
    assert_eq!(attr_str(&server, "llm_gateway.metadata.team"), "search");
    assert!(!attr_str(&server, "request_id").is_empty());
    // The call's log line is a log line, not a span event: its fields are
    // the span's attributes already.
    assert!(server.events.iter().all(|e| e.name != "call finished"), "{:?}", server.events);

    let client_span = collector.span("the client span", |s| s.name == "chat gpt-4o-mini").await;
    assert_eq!(hex(&client_span.trace_id), TRACE_ID);
    assert_eq!(client_span.parent_span_id, server.span_id, "the attempt is the server span's child");
    assert_eq!(client_span.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(attr_str(&client_span, "gen_ai.operation.name"), "chat");
    assert_eq!(attr_str(&client_span, "gen_ai.provider.name"), "openai");
    assert_eq!(attr_str(&client_span, "gen_ai.request.model"), "gpt-4o-mini");
    assert_eq!(attr_str(&client_span, "gen_ai.response.model"), "gpt-4o-mini-2024");
    assert_eq!(attr_str(&client_span, "gen_ai.response.id"), "c1");
    assert_eq!(attr_int(&client_span, "gen_ai.request.max_tokens"), 64);
    assert_eq!(attr_int(&client_span, "gen_ai.usage.input_tokens"), 7);
    assert_eq!(attr_int(&client_span, "gen_ai.usage.output_tokens"), 2);
    assert_eq!(attr_str(&client_span, "server.address"), "127.0.0.1");
    assert_eq!(attr_int(&client_span, "server.port"), i64::from(upstream.addr().port()));
    match attr(&client_span, "gen_ai.response.finish_reasons") {
        Some(Value::ArrayValue(a)) => {
            assert!(matches!(a.values[0].value, Some(Value::StringValue(ref s)) if s == "stop"))
        }
        other => panic!("finish_reasons is {other:?}"),
    }
    assert!(
        client_span.events.iter().any(|e| e.name == "gen_ai.first_token"),
        "an event marks the first token: {:?}",
        client_span.events
    );
    assert!(attr(&client_span, "error.type").is_none());

    // The upstream request carries the attempt's context: same trace, the
    // client span as parent.
    let req = upstream.requests().pop().expect("one upstream request");
    let (trace, parent) = parse_traceparent(req.header("traceparent").expect("traceparent upstream"));
    assert_eq!(trace, TRACE_ID);
    assert_eq!(parent, hex(&client_span.span_id));
}

#[tokio::test]
async fn cancelled_call_still_ends_its_spans_marked_cancelled() {
    let collector = Collector::start().await;
    let mut steps: Vec<Step> = openai::answer("c2", "gpt-4o-mini", &["one "], "stop", 3, 1)
        .into_iter()
        .take(2)
        .map(Step::send)
        .collect();
    steps.push(Step::sleep_ms(60_000));
    let upstream = Upstream::start(Reply::sse(steps)).await;
    let gw = traced_gateway(&upstream, &collector).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(gw.grpc).await);
    let response =
        within(WAIT, "StreamCompletion", client.stream_completion(traced(stream_request("chat", "hi"))))
            .await
            .expect("call");
    let mut stream = response.into_inner();
    let first =
        within(WAIT, "the first message", stream.message()).await.expect("stream").expect("a message");
    assert_eq!(first.model, "gpt-4o-mini");
    drop(stream);
    within(WAIT, "the upstream to see the close", upstream.closed()).await;

    let server = collector
        .span("the cancelled server span", |s| s.name == "llmgateway.v1.LlmGateway/StreamCompletion")
        .await;
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert!(matches!(attr(&server, "llm_gateway.cancelled"), Some(Value::BoolValue(true))));
    assert_eq!(attr_int(&server, "rpc.grpc.status_code"), 1, "CANCELLED");
    assert!(attr_int(&server, "llm_gateway.streamed_deltas") >= 1, "the deltas streamed so far are counted");
    let client_span = collector.span("the cancelled client span", |s| s.name == "chat gpt-4o-mini").await;
    assert_eq!(attr_str(&client_span, "error.type"), "cancelled");
    assert!(attr_int(&client_span, "llm_gateway.streamed_deltas") >= 1);
}

#[tokio::test]
async fn a_collector_that_is_down_does_not_fail_calls() {
    // Nothing listens on this port once the listener is dropped.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let upstream = Upstream::start(Reply::events(&openai::answer("c3", "m", &["ok"], "stop", 1, 1))).await;
    let endpoint = format!("http://{dead}");
    let gw = Binary::start(
        &gateway_yaml(&upstream.base_url()),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "10")],
    )
    .await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(gw.grpc).await);
    for _ in 0..5 {
        let answer = stream_call(&mut client, stream_request("chat", "hi")).await;
        answer.end.as_ref().expect("the stream ends OK");
        assert_eq!(answer.text(), "ok");
    }
    // Shutdown flushes (and gives up on) the queue within a bound.
    gw.proc.signal("TERM");
    let mut proc = gw.proc;
    let status = within(Duration::from_secs(20), "the gateway to exit", proc.exit()).await;
    assert!(status.success(), "exit status {status:?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_hedged_call_exports_both_attempts_and_its_attempt_events() {
    let collector = Collector::start().await;
    let slow = Upstream::start(Reply::sse(vec![Step::Hang])).await;
    let fast = Upstream::start(Reply::events(&openai::answer("c2", "fast-m", &["ok"], "stop", 1, 1))).await;
    let yaml = format!(
        "\
providers:
  slow:
    kind: openai
    base_url: {}
    retry: {{ attempts: 1 }}
  fast:
    kind: openai
    base_url: {}
models:
  chat:
    hedge_after: 50ms
    targets: [{{ provider: slow, model: slow-m }}, {{ provider: fast, model: fast-m }}]
",
        slow.base_url(),
        fast.base_url()
    );
    let endpoint = collector.endpoint();
    let gw = Binary::start(
        &yaml,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(gw.grpc).await);
    let answer = stream_call(&mut client, traced(stream_request("chat", "hi"))).await;
    answer.end.as_ref().expect("the hedge answers");
    assert_eq!(answer.text(), "ok");

    let server =
        collector.span("the server span", |s| s.name == "llmgateway.v1.LlmGateway/StreamCompletion").await;
    let loser = collector.span("the slow attempt", |s| s.name == "chat slow-m").await;
    let winner = collector.span("the hedged attempt", |s| s.name == "chat fast-m").await;
    assert_eq!(loser.parent_span_id, server.span_id);
    assert_eq!(winner.parent_span_id, server.span_id);
    assert_eq!(attr_str(&loser, "error.type"), "cancelled", "the loser was aborted");
    assert!(attr(&winner, "error.type").is_none());
    let attempts: Vec<_> = server.events.iter().filter(|e| e.name == "llm_gateway.attempt").collect();
    assert_eq!(attempts.len(), 2, "one event per attempt: {:?}", server.events);
}

#[tokio::test]
async fn an_http_call_exports_its_server_span_under_the_callers_trace() {
    let collector = Collector::start().await;
    let upstream =
        Upstream::start(Reply::events(&openai::answer("c4", "gpt-4o-mini", &["ok"], "stop", 3, 1))).await;
    let endpoint = collector.endpoint();
    let yaml = format!("http_listen: 127.0.0.1:0\n{}", gateway_yaml(&upstream.base_url()));
    let gw = Binary::start(
        &yaml,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .await;
    let http_addr = gw.http.expect("the serving line names http_addr");
    let response = within(
        WAIT,
        "POST /v1/chat/completions",
        crate::harness::http()
            .post(format!("http://{http_addr}/v1/chat/completions"))
            .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
            .json(&serde_json::json!({"model": "chat", "stream": true, "metadata": {"team": "search"},
                                      "messages": [{"role": "user", "content": "hi"}]}))
            .send(),
    )
    .await
    .expect("response");
    assert_eq!(response.status().as_u16(), 200);
    let _ = within(WAIT, "the body", response.text()).await.expect("body");

    let server = collector.span("the HTTP server span", |s| s.name == "POST /v1/chat/completions").await;
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(attr_str(&server, "http.request.method"), "POST");
    assert_eq!(attr_str(&server, "http.route"), "/v1/chat/completions");
    assert_eq!(attr_int(&server, "http.response.status_code"), 200);
    assert_eq!(attr_str(&server, "llm_gateway.metadata.team"), "search");
    assert_eq!(attr_str(&server, "gen_ai.request.model"), "chat");
    let client_span = collector.span("the client span", |s| s.name == "chat gpt-4o-mini").await;
    assert_eq!(client_span.parent_span_id, server.span_id, "the attempt is the HTTP call's child");
}
