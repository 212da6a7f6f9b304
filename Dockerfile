# submitd container: small, non-root, spool and config as volumes.
# Build:  docker build -t submitd .        (BASE can point at a local image: --build-arg BASE=...)
# Run:    docker run -v $PWD/etc:/etc/submitd -v submitd-spool:/var/spool/submitd -p 587:587 -p 465:465 submitd
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY submitd ./submitd
COPY plugins ./plugins
RUN python -m pip wheel --no-cache-dir -w /wheels .

FROM ${BASE}
RUN useradd --system --uid 10587 --home-dir /var/spool/submitd --shell /usr/sbin/nologin submitd \
 && mkdir -p /etc/submitd /var/spool/submitd \
 && chown submitd:submitd /var/spool/submitd
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels submitd && rm -rf /wheels
USER submitd
ENV SUBMITD_CONFIG=/etc/submitd/submitd.toml
VOLUME ["/etc/submitd", "/var/spool/submitd"]
EXPOSE 587 465
# Alive when the STARTTLS listener greets.
HEALTHCHECK --interval=30s --timeout=5s \
  CMD python -c "import socket,sys; s=socket.create_connection(('127.0.0.1',587),3); sys.exit(0 if s.recv(4).startswith(b'220') else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["submitd"]
CMD ["serve"]
