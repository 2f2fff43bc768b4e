//! Client keys: `authorization: Bearer KEY` against the config's SHA-256
//! digests, each key's model allow-list; health and reflection need no key.

use llm_gateway::api::pb::{self, llm_gateway_client::LlmGatewayClient};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    harness::{Gateway, WAIT, completion_request, config, stream_call, stream_request, within},
    service::list_services_v1,
    upstream::{Reply, Upstream},
};

const KEY_A: &str = "sk-team-a-secret";
const KEY_B: &str = "sk-team-b-secret";

fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

async fn gateway(up: &Upstream) -> Gateway {
    Gateway::start(&format!(
        "{}api_keys:\n  - {{ name: team-a, key_sha256: \"{}\", models: [lorem, chat] }}\n  - {{ name: team-b, key_sha256: \"{}\" }}\n",
        config(&up.base_url()),
        digest(KEY_A),
        digest(KEY_B)
    ))
    .await
}

fn with_auth<T>(message: T, value: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", value.parse().expect("ascii"));
    r
}

async fn completion_code(
    client: &mut LlmGatewayClient<Channel>,
    request: Request<pb::CompletionRequest>,
) -> Code {
    match within(WAIT, "Completion", client.completion(request)).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;

    let no_key = Request::new(completion_request("lorem", "hi"));
    assert_eq!(completion_code(&mut client, no_key).await, Code::Unauthenticated);
    for bad in [format!("Bearer {KEY_A}x"), "Bearer ".into(), format!("Basic {KEY_A}"), KEY_A.into()] {
        let code = completion_code(&mut client, with_auth(completion_request("lorem", "hi"), &bad)).await;
        assert_eq!(code, Code::Unauthenticated, "authorization: {bad}");
    }
    let got = stream_call(&mut client, stream_request("lorem", "hi")).await;
    assert_eq!(got.error().code(), Code::Unauthenticated, "{got:?}");
    // No key, unknown model: the caller learns nothing about model names.
    let got = stream_call(&mut client, stream_request("no-such-model", "hi")).await;
    assert_eq!(got.error().code(), Code::Unauthenticated, "{got:?}");
    let s = within(WAIT, "ListModels", client.list_models(pb::ListModelsRequest::default()))
        .await
        .expect_err("ListModels needs a key");
    assert_eq!(s.code(), Code::Unauthenticated);
    // Nothing reached the upstream.
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    assert_eq!(got.error().code(), Code::Unauthenticated, "{got:?}");
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn a_key_may_use_its_models_only() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let bearer_a = format!("Bearer {KEY_A}");

    let code = completion_code(&mut client, with_auth(completion_request("lorem", "hi"), &bearer_a)).await;
    assert_eq!(code, Code::Ok, "team-a may use lorem");
    // Scheme case and surrounding spaces do not matter.
    let code = completion_code(
        &mut client,
        with_auth(completion_request("lorem", "hi"), &format!("bearer  {KEY_A} ")),
    )
    .await;
    assert_eq!(code, Code::Ok, "lower-case scheme");
    let code = completion_code(&mut client, with_auth(completion_request("echo", "hi"), &bearer_a)).await;
    assert_eq!(code, Code::PermissionDenied, "team-a may not use echo");
    let got = stream_call(&mut client, with_auth(stream_request("echo", "hi"), &bearer_a)).await;
    assert_eq!(got.error().code(), Code::PermissionDenied, "{got:?}");

    // A key with no list may use every model.
    let code =
        completion_code(&mut client, with_auth(completion_request("echo", "hi"), &format!("Bearer {KEY_B}")))
            .await;
    assert_eq!(code, Code::Ok, "team-b may use every model");
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn list_models_shows_a_key_its_models() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let r = within(
        WAIT,
        "ListModels",
        client.list_models(with_auth(pb::ListModelsRequest::default(), &format!("Bearer {KEY_A}"))),
    )
    .await
    .expect("ListModels")
    .into_inner();
    let names: Vec<&str> = r.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["chat", "lorem"]);
}

#[tokio::test]
async fn health_and_reflection_need_no_key() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = gateway(&up).await;
    let channel = gw.channel().await;
    let r =
        within(WAIT, "Health/Check", HealthClient::new(channel.clone()).check(HealthCheckRequest::default()))
            .await
            .expect("health answers without a key")
            .into_inner();
    assert_eq!(r.status, ServingStatus::Serving as i32);
    let services = list_services_v1(channel).await;
    assert!(services.iter().any(|s| s == "llmgateway.v1.LlmGateway"), "{services:?}");
}
