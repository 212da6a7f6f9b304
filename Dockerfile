# submitd container: small, non-root (uid 10587), config and spool as volumes; docs/container.md.
# Build:    docker build -t submitd .
# Offline:  pip wheel -w /path/to/wheels .   then
#           docker build --build-context wheels=/path/to/wheels -t submitd .
#           (the named context replaces the `wheels` stage below: nothing is fetched from PyPI)
# Base:     --build-arg BASE=IMAGE  any Debian-like image with python3 >= 3.11 and its venv module
# Run:      docker run -v $PWD/etc:/etc/submitd -v submitd-spool:/var/spool/submitd \
#             -p 587:587 -p 465:465 --stop-timeout 40 submitd
ARG BASE=python:3.11-slim-bookworm

# A virtual environment, not the system site-packages: the same steps work on the python
# image and on a distribution python (Debian's refuses `pip install` there, PEP 668).
FROM ${BASE} AS venv
RUN python3 -m venv /opt/submitd

# Wheels for submitd and every dependency, built from this checkout (needs PyPI).
FROM venv AS build-wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY submitd ./submitd
COPY plugins ./plugins
RUN /opt/submitd/bin/pip wheel --no-cache-dir --disable-pip-version-check -w /wheels .

# The wheels alone, at the root. `--build-context wheels=DIR` replaces this stage with a
# directory of prebuilt wheels, and build-wheels is then skipped.
FROM scratch AS wheels
COPY --from=build-wheels /wheels/ /

FROM venv AS install
COPY --from=wheels / /wheels/
# Install from the wheels only; pip itself is not needed at run time.
RUN /opt/submitd/bin/pip install --no-cache-dir --disable-pip-version-check \
      --no-index --find-links /wheels submitd \
 && /opt/submitd/bin/pip uninstall --yes --disable-pip-version-check pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 10587 submitd \
 && useradd --system --uid 10587 --gid submitd --home-dir /var/spool/submitd \
      --shell /usr/sbin/nologin submitd \
 && mkdir -p /etc/submitd /var/spool/submitd \
 && chown submitd:submitd /var/spool/submitd
COPY --from=install /opt/submitd /opt/submitd
ENV PATH=/opt/submitd/bin:$PATH \
    SUBMITD_CONFIG=/etc/submitd/submitd.toml \
    SUBMITD_HEALTHCHECK_ADDRESS=127.0.0.1:587
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10587:10587
VOLUME ["/etc/submitd", "/var/spool/submitd"]
EXPOSE 587 465
# Healthy when the STARTTLS listener at $SUBMITD_HEALTHCHECK_ADDRESS (host:port, [v6]:port)
# greets with 220; QUIT keeps the probe polite. Set it when the config listens elsewhere.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["python3", "-c", "import os, socket; \
h, _, p = os.environ['SUBMITD_HEALTHCHECK_ADDRESS'].rpartition(':'); \
s = socket.create_connection((h.strip('[]'), int(p)), 3); \
ok = s.makefile('rb').readline(512).startswith(b'220'); \
s.sendall(b'QUIT\\r\\n'); \
raise SystemExit(0 if ok else 1)"]
# submitd handles SIGTERM itself (stop accepting, drain for limits.shutdown_grace, default 30 s):
# give `docker stop` more than that, e.g. --stop-timeout 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["submitd"]
CMD ["serve"]
