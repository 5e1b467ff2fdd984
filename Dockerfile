# syntax=docker/dockerfile:1
#
# Container image of the Luna Node CSI driver (controller and node plugin).
#
#   docker build -t ghcr.io/lunanode-csi/lunanode-csi:0.1.0 .

# --- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The same build command as documented in deploy/README.md.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/lunanode-csi /lunanode-csi

# --- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
# mkfs/fsck/resize for ext4 (e2fsprogs) and xfs (xfsprogs); blkid, findmnt,
# blockdev (util-linux); mount/umount (mount); TLS roots for the API.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs xfsprogs util-linux ca-certificates mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /lunanode-csi /usr/local/bin/lunanode-csi
LABEL org.opencontainers.image.title="lunanode-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver for Luna Node block storage" \
      org.opencontainers.image.source="https://github.com/lunanode-csi/lunanode-csi"
ENTRYPOINT ["/usr/local/bin/lunanode-csi"]
