# Builds both binaries; the same image runs `api serve` or `worker` (see docker-compose.yml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
 && cp target/release/api target/release/worker /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 turnstile \
 && mkdir -p /data/images && chown turnstile /data/images
COPY --from=build /usr/local/bin/api /usr/local/bin/worker /usr/local/bin/
USER turnstile
EXPOSE 8080
CMD ["api", "serve"]
