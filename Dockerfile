# syntax=docker/dockerfile:1
# The Bulkhead image: `bulkhead` (agent, install-cni, CLI) and `bulkhead-cni`.
#   docker build -t ghcr.io/bulkhead-cni/bulkhead:0.1.0 .
# The toolchain recipe is scripts/setup.sh's: stable Rust for user space, a nightly that
# ships LLVM 22 plus rust-src for the eBPF crate, and bpf-linker built against LLVM 22
# (a bpf-linker on another LLVM cannot link the nightly's bitcode).

# Builder and runtime share Debian 12, so the binaries' glibc matches.
FROM rust:1.95-bookworm AS builder
# A dated nightly that reports LLVM 22; cargo's `+nightly` (aya-build) must resolve to it.
ARG NIGHTLY=nightly-2026-05-19
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev clang \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)"
RUN rustc +nightly -vV | grep -q '^LLVM version: 22' \
 || { echo "rustc +nightly does not report LLVM 22; pick another NIGHTLY" >&2; exit 1; }
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# build.rs compiles the eBPF object with the nightly and embeds it in `bulkhead`.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bulkhead -p bulkhead-cni --bins \
 && install -D -m 0755 target/release/bulkhead target/release/bulkhead-cni -t /out/

FROM debian:bookworm-slim
# iproute2: `ip`/`tc` for debugging a node from `kubectl exec`; ca-certificates: TLS to the API
# server through a proxy or an external kubeconfig; nftables: `nft`, which the agent runs
# (`nft -j`) to write its masquerade table.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 ca-certificates nftables \
 && rm -rf /var/lib/apt/lists/*
# install-cni looks for bulkhead-cni next to its own executable.
COPY --from=builder /out/bulkhead /out/bulkhead-cni /usr/local/bin/
LABEL org.opencontainers.image.title="bulkhead" \
      org.opencontainers.image.description="Label-based Kubernetes network policy enforced in eBPF" \
      org.opencontainers.image.licenses="Apache-2.0"
# Root, with the capabilities the DaemonSet grants (README, "Permissions").
USER 0
CMD ["bulkhead", "agent", "--config", "/etc/bulkhead/config.yaml"]
