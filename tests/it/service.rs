//! The services beside completions: ListModels, health, reflection (v1 and
//! v1alpha, so `grpcurl list` / `describe` work), and the admin endpoints.

use llm_gateway::api::pb;
use prost::Message;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::harness::{Gateway, WAIT, eventually, get_status, within};

/// `grpcurl list` over reflection v1.
pub(crate) async fn list_services_v1(channel: Channel) -> Vec<String> {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut answers =
        within(WAIT, "reflection v1", client.server_reflection_info(tokio_stream::iter([request])))
            .await
            .expect("reflection v1 answers")
            .into_inner();
    let answer =
        within(WAIT, "a reflection answer", answers.message()).await.expect("ok").expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("not a service list: {other:?}"),
    }
}

async fn list_services_v1alpha(channel: Channel) -> Vec<String> {
    use v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut answers =
        within(WAIT, "reflection v1alpha", client.server_reflection_info(tokio_stream::iter([request])))
            .await
            .expect("reflection v1alpha answers")
            .into_inner();
    let answer =
        within(WAIT, "a reflection answer", answers.message()).await.expect("ok").expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("not a service list: {other:?}"),
    }
}

/// `grpcurl describe llmgateway.v1.LlmGateway` over reflection v1.
async fn describe_v1(channel: Channel, symbol: &str) -> Vec<prost_types::FileDescriptorProto> {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut answers =
        within(WAIT, "reflection v1", client.server_reflection_info(tokio_stream::iter([request])))
            .await
            .expect("reflection v1 answers")
            .into_inner();
    let answer =
        within(WAIT, "a reflection answer", answers.message()).await.expect("ok").expect("one answer");
    match answer.message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => f
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).expect("a file descriptor"))
            .collect(),
        other => panic!("not a file descriptor: {other:?}"),
    }
}

#[tokio::test]
async fn list_models_lists_the_configured_models() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut client = gw.client().await;
    let r = within(WAIT, "ListModels", client.list_models(pb::ListModelsRequest::default()))
        .await
        .expect("ListModels")
        .into_inner();
    let names: Vec<&str> = r.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["chat", "claude", "down", "echo", "flaky", "lorem", "refused", "slow"]);
    let chat = &r.models[0];
    assert_eq!(
        chat.targets,
        [pb::ModelTarget { provider: "oa".into(), model: "gpt-4o-mini".into() }],
        "the targets of `chat`"
    );
}

#[tokio::test]
async fn health_is_serving() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut health = HealthClient::new(gw.channel().await);
    for service in ["", "llmgateway.v1.LlmGateway"] {
        let r = within(WAIT, "Health/Check", health.check(HealthCheckRequest { service: service.into() }))
            .await
            .unwrap_or_else(|s| panic!("health of {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "health of {service:?}");
    }
    let s =
        within(WAIT, "Health/Check", health.check(HealthCheckRequest { service: "no.such.Service".into() }))
            .await
            .expect_err("an unknown service");
    assert_eq!(s.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_the_services() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let channel = gw.channel().await;
    for (version, services) in [
        ("v1", list_services_v1(channel.clone()).await),
        ("v1alpha", list_services_v1alpha(channel.clone()).await),
    ] {
        for wanted in ["llmgateway.v1.LlmGateway", "grpc.health.v1.Health"] {
            assert!(
                services.iter().any(|s| s == wanted),
                "reflection {version} lists {wanted}: {services:?}"
            );
        }
    }
}

#[tokio::test]
async fn reflection_describes_the_service() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let files = describe_v1(gw.channel().await, "llmgateway.v1.LlmGateway").await;
    let service = files
        .iter()
        .flat_map(|f| f.service.iter().map(move |s| (f.package(), s)))
        .find(|(package, s)| *package == "llmgateway.v1" && s.name() == "LlmGateway")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no llmgateway.v1.LlmGateway in {files:?}"));
    let methods: Vec<(&str, bool)> =
        service.method.iter().map(|m| (m.name(), m.server_streaming())).collect();
    assert_eq!(methods, [("Completion", false), ("StreamCompletion", true), ("ListModels", false)]);
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    assert_eq!(get_status(&gw.admin_url("/healthz")).await, 200);
    // Ready once serving; the admin listener may answer a moment before.
    let readyz = gw.admin_url("/readyz");
    eventually(WAIT, "/readyz to answer 200", async || get_status(&readyz).await == 200).await;
    let metrics = within(WAIT, "/metrics", crate::harness::http().get(gw.admin_url("/metrics")).send())
        .await
        .expect("/metrics answers");
    assert_eq!(metrics.status().as_u16(), 200);
    let text = within(WAIT, "/metrics body", metrics.text()).await.expect("text");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text: {text}");
}
