//! The gRPC face of the gateway: the `LlmGateway` service, health and
//! reflection. Request validation, auth and status mapping live here; the
//! generated proto types go no further down.

mod auth;
mod call;
mod convert;
mod error;
mod service;
mod stream;

pub use auth::Keys;
pub use error::CallError;
pub use service::{Gateway, GatewayService};

/// The generated types and stubs of `proto/llmgateway/v1/gateway.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("llmgateway.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/llmgateway_descriptor.bin"));
}
