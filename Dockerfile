# syntax=docker/dockerfile:1
#
# The llm-gateway image: the release binary on distroless, as a non-root user.
#
#   docker build -t llm-gateway:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 llm-gateway:0.1.0
#
# Without a config (--config or LLM_GATEWAY_CONFIG) the gateway serves its
# embedded default: a `mock` model on 0.0.0.0:50051. The Helm chart mounts a
# config at /etc/llm-gateway/config.yaml and points LLM_GATEWAY_CONFIG at it.

# ---- build: the toolchain, the sources, `cargo build --release --locked` ----
# rust:*-slim-bookworm carries gcc and libc6-dev (ring and jemalloc compile C); the proto
# is compiled by protox in build.rs, so no protoc is needed. Bookworm matches
# the runtime's glibc.
FROM rust:1.89-slim-bookworm AS build
# make: jemalloc, the default allocator (tikv-jemalloc-sys), builds with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what the build reads: the manifest and lockfile, build.rs, the proto,
# the sources. The test and bench sources are there because Cargo.toml names
# them and cargo resolves every target of the manifest; they are not built.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# The registry and target caches survive between builds (BuildKit); the
# binary is copied out of the cached target dir, which the next stage cannot see.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin llm-gateway \
    && install -D -m 0755 target/release/llm-gateway /out/llm-gateway

# ---- runtime: glibc, libgcc and CA roots, no shell, no package manager ----
# distroless/cc: the binary links glibc and libgcc_s (unwinding); its TLS
# (rustls, ring) needs nothing else. The :nonroot tag runs as 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="Streaming-first gRPC gateway to LLM providers" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/llm-gateway /usr/local/bin/llm-gateway
# Numeric, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 65532:65532
# gRPC (listen), admin HTTP: /metrics, /healthz, /readyz (admin_listen),
# OpenAI-compatible HTTP (http_listen, off unless configured).
EXPOSE 50051 9464 8080
ENTRYPOINT ["/usr/local/bin/llm-gateway"]
