//! The gRPC front door: the `LlmGateway` service as a thin adapter over the
//! call core (proto to chat types and back, metadata to plain values, and one
//! map from the core's errors to gRPC statuses). The generated proto types go
//! no further down.

mod convert;
mod error;
mod limit;
mod metadata;
mod service;
mod stream;

pub use error::{GRPC, code, request_too_large, to_status};
pub use limit::RequestLimit;
/// For the fuzz targets (`fuzz/`) and the test replaying their corpus.
#[doc(hidden)]
pub use metadata::grpc_timeout;
pub use service::GatewayService;

/// The generated types and stubs of `proto/llmgateway/v1/gateway.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("llmgateway.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/llmgateway_descriptor.bin"));
}
