//! The `LlmGateway` gRPC service: each RPC reads its metadata, hands the
//! call to the call core, and answers in proto, whole (`Completion`) or as a
//! stream (`StreamCompletion`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert::{self, RequestParts},
    error::{GRPC, call_status, response_headers},
    metadata, pb,
    stream::ResponseStream,
};
use crate::core::Core;

#[derive(Clone)]
pub struct GatewayService(pub Arc<Core>);

const COMPLETION: &str = "llmgateway.v1.LlmGateway/Completion";
const STREAM_COMPLETION: &str = "llmgateway.v1.LlmGateway/StreamCompletion";

#[tonic::async_trait]
impl pb::llm_gateway_server::LlmGateway for GatewayService {
    type StreamCompletionStream = ResponseStream;

    async fn completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<Response<pb::CompletionResponse>, Status> {
        let core = &self.0;
        let (md, _, body) = request.into_parts();
        let span = metadata::span(COMPLETION, "Completion");
        let mut call = core.start(&GRPC, "Completion", span, &metadata::call_meta(&md));
        let parts = RequestParts::from(body);
        match core.complete(&mut call, metadata::authorization(&md), parts).await {
            Ok(answer) => {
                let tool_calls = answer
                    .tool_calls
                    .into_iter()
                    .map(|c| pb::ToolCall { id: c.id, name: c.name, arguments_json: c.arguments_json })
                    .collect();
                let mut response = Response::new(pb::CompletionResponse {
                    id: answer.id,
                    model: call.upstream_model().map(|m| m.to_string()).unwrap_or_default(),
                    provider: call.provider().map(|p| p.to_string()).unwrap_or_default(),
                    content: answer.content,
                    reasoning: answer.reasoning,
                    tool_calls,
                    finish_reason: convert::finish_reason(answer.finish.reason) as i32,
                    usage: Some(convert::usage(answer.finish.usage, answer.cost_usd)),
                });
                *response.metadata_mut() = response_headers(&call);
                Ok(response)
            }
            Err(e) => Err(call_status(&mut call, e)),
        }
    }

    async fn stream_completion(
        &self,
        request: Request<pb::StreamCompletionRequest>,
    ) -> Result<Response<Self::StreamCompletionStream>, Status> {
        let core = &self.0;
        let (md, _, body) = request.into_parts();
        let span = metadata::span(STREAM_COMPLETION, "StreamCompletion");
        let mut call = core.start(&GRPC, "StreamCompletion", span, &metadata::call_meta(&md));
        let parts = RequestParts::from(body);
        match core.open_stream(&mut call, metadata::authorization(&md), parts).await {
            Ok(routed) => {
                let headers = response_headers(&call);
                let mut response = Response::new(ResponseStream::new(core.commit(call, routed)));
                *response.metadata_mut() = headers;
                Ok(response)
            }
            Err(e) => Err(call_status(&mut call, e)),
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let core = &self.0;
        let md = request.metadata();
        let span = metadata::span("llmgateway.v1.LlmGateway/ListModels", "ListModels");
        let mut call = core.start(&GRPC, "ListModels", span, &metadata::call_meta(md));
        let models = match core.models(&mut call, metadata::authorization(md)) {
            Ok(m) => m,
            Err(e) => return Err(call_status(&mut call, e)),
        };
        let models = models
            .into_iter()
            .map(|m| pb::Model {
                name: m.name,
                targets: m
                    .targets
                    .into_iter()
                    .map(|(provider, model)| pb::ModelTarget {
                        provider: provider.to_string(),
                        model: model.to_string(),
                    })
                    .collect(),
            })
            .collect();
        let mut response = Response::new(pb::ListModelsResponse { models });
        *response.metadata_mut() = response_headers(&call);
        Ok(response)
    }
}
