# tidegate container image: build the release binary, ship it with the example configuration.
#   docker build -t tidegate .
#   docker run --rm -p 8080:8080 tidegate

FROM rust:1-bookworm AS builder
WORKDIR /src
# Build PCRE2 from pcre2-sys's bundled sources and link it statically, so the binary does not
# depend on whichever libpcre2 the builder image happens to carry.
ENV PCRE2_SYS_STATIC=1
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin tidegate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /etc/tidegate --shell /usr/sbin/nologin tidegate
COPY --from=builder /src/target/release/tidegate /usr/local/bin/tidegate
COPY conf /etc/tidegate/conf
COPY lua /etc/tidegate/lua
COPY html /etc/tidegate/html
# The error log, access log and pid file go to logs/ under the prefix: the only writable path.
RUN mkdir -p /etc/tidegate/logs && chown tidegate:tidegate /etc/tidegate/logs
USER tidegate
WORKDIR /etc/tidegate
ENV TIDEGATE_PORT=8080
EXPOSE 8080
# As with nginx, SIGQUIT drains in-flight requests; Docker's default SIGTERM would cut them off.
STOPSIGNAL SIGQUIT
# tidegate never daemonizes: it stays in the foreground as PID 1.
CMD ["tidegate", "-p", "/etc/tidegate", "-c", "conf/nginx.conf"]
