# pushgate's container image: `docker build -t pushgate .` or `podman build -t pushgate .`
#
# Two stages. The build stage is the official Rust image (Debian 12); the runtime is Google's
# distroless "cc" image for Debian 12: glibc, libgcc, CA certificates and a `nonroot` user, and
# nothing else (no shell, no package manager). pushgate is a glibc binary that needs exactly
# that, so the image is the binary plus about 5 MB of libraries, runs as an unprivileged user,
# and offers an attacker no tools. A fully static musl binary on `scratch` would save those few
# MB but needs a musl target and toolchain in every build, and would not be the glibc binary
# that every other test and benchmark runs; README (Container image) has the measured sizes.
#
# Defaults fit the container platforms (README: App Runner, App Platform, Fly.io): the platform's
# PORT (8080 unless it sets another), JSON logs on stdout, and a drain that ends inside Fly's
# default 5 s kill timeout, the shortest of the three. Override any of them with -e / the
# platform's environment settings.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. Empty targets stand in for the crates' sources meanwhile.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked -p pushgate \
 && rm -rf src bench/src target/release/.fingerprint/pushgate-* target/release/deps/pushgate-* \
           target/release/deps/libpushgate-*
COPY bench/src bench/src
COPY redis redis
COPY src src
RUN cargo build --release --locked -p pushgate \
 && cp target/release/pushgate /pushgate
# The release profile keeps line tables for backtraces on a developer's machine (83 MB); the
# image keeps the symbols (function names in a panic's backtrace) and drops the rest: 16 MB.
RUN strip --strip-debug /pushgate

FROM ${RUNTIME_IMAGE}
COPY --from=build /pushgate /usr/local/bin/pushgate
# The platforms set PORT; 8080 when they do not (App Platform's and App Runner's default).
ENV PORT=8080 \
    PUSHGATE_LOG_FORMAT=json \
    PUSHGATE_LOG_OUTPUT=stdout \
    PUSHGATE_SHUTDOWN_DRAIN_MS=2500 \
    PUSHGATE_SHUTDOWN_GRACE_MS=4000
# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 65532:65532
EXPOSE 8080
# For Docker and Compose (the platforms probe /healthz and /readyz over HTTP themselves, see
# deploy/). There is no shell or curl in the image: the binary probes itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/pushgate", "health"]
ENTRYPOINT ["/usr/local/bin/pushgate"]
CMD ["serve"]
