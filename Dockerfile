# syntax=docker/dockerfile:1
#
# Container image of the Luna Node CSI driver (controller and node plugin).
#
#   docker build -t ghcr.io/lunanode-csi/lunanode-csi:0.1.0 .
#
# What the image holds is decided by deploy/image/rootfs.sh alone: the driver, the programs
# the node runs (src/volumes/tools.txt) and exactly the libraries and files they need. No
# shell, no interpreter, no package manager. tests/image/run.sh runs that script on a
# Debian machine and everything the image ships inside its result.

# --- build -----------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The same build command as documented in deploy/README.md.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/lunanode-csi /lunanode-csi

# --- root filesystem, from Debian packages -----------------------------------
FROM debian:bookworm AS rootfs
COPY deploy/image/ /src/deploy/image/
COPY src/volumes/tools.txt /src/src/volumes/tools.txt
COPY --from=builder /lunanode-csi /lunanode-csi
RUN apt-get update \
    && bash /src/deploy/image/rootfs.sh /rootfs /lunanode-csi

# --- runtime ---------------------------------------------------------------
FROM scratch
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="lunanode-csi" \
      org.opencontainers.image.description="Kubernetes CSI driver for Luna Node block storage" \
      org.opencontainers.image.source="https://github.com/lunanode-csi/lunanode-csi"
ENTRYPOINT ["/usr/local/bin/lunanode-csi"]
