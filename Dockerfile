# The cynchrod daemon as a container image. Build it with scripts/build-image (no registry
# needed: it makes the base from Debian's packages when missing and feeds pip a local
# wheelhouse), or with `docker build .` where python:3.11-slim-bookworm and PyPI are reachable.
# Run it with the engine's socket mounted: see docs/container.md and compose.yaml.

# Any Debian-like image with Python 3.11+ and venv: the official python:3.11-slim-bookworm
# (python at /usr/local/bin) or scripts/build-image's Debian-made one (python3 at /usr/bin).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# Marks the build stage's images (the cache, untagged), so scripts/build-image can drop stale ones.
LABEL io.cynchrod.build-stage=1
# scripts/build-image passes PIP_NO_INDEX=1: every wheel then comes from build/wheelhouse.
ARG PIP_NO_INDEX
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/src/wheelhouse
RUN python3 -m venv /opt/cynchrod
# The dependencies first, in a layer of their own: a change to cynchrod's code reuses it.
# constraints.txt always matches, the wheelhouse only when scripts/build-image made one.
COPY constraints.txt build/wheelhous[e] /src/wheelhouse/
COPY setup.cfg /src/
RUN python3 -c 'import configparser; c = configparser.ConfigParser(); c.read("/src/setup.cfg"); \
print("\n".join(l for l in c["options"]["install_requires"].splitlines() if l.strip() and not l.startswith("#")))' \
      > /src/requirements.txt \
 && /opt/cynchrod/bin/pip install -q -c /src/wheelhouse/constraints.txt -r /src/requirements.txt
# Then cynchrod itself (its dependencies are all there: --no-deps keeps this layer offline).
COPY pyproject.toml README.md /src/
# cynchrod/schemas is a link to the top-level schemas/ (one copy for editors and the package).
COPY schemas /src/schemas
COPY cynchrod /src/cynchrod
RUN /opt/cynchrod/bin/pip install -q --no-deps -c /src/wheelhouse/constraints.txt /src \
 && /opt/cynchrod/bin/cynchrod --version \
 && /opt/cynchrod/bin/pip uninstall -q -y pip setuptools
# (pip and setuptools are not needed to run, and the venv's copies are old: scanners flag them.)

FROM ${BASE}
# An unprivileged user owns the state; the Docker socket's group is added at run time
# (--group-add "$(stat -c %g /var/run/docker.sock)", compose: group_add), as it varies by host.
ARG UID=10001
RUN groupadd --system --gid ${UID} cynchrod \
 && useradd --system --uid ${UID} --gid cynchrod --home-dir /var/lib/cynchrod --no-create-home \
      --shell /usr/sbin/nologin cynchrod \
 && install -d -o cynchrod -g cynchrod -m 0750 /var/lib/cynchrod \
 && printf '[safe]\n\tdirectory = *\n' > /etc/gitconfig
# safe.directory: a repository mounted in belongs to a user of the host, and libgit2 (like git)
# refuses to open a repository another user owns unless this says so. The only repositories in
# this container are the ones its operator mounts.
COPY --from=build /opt/cynchrod /opt/cynchrod
ENV PATH=/opt/cynchrod/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    CYNCHROD_STATE=/var/lib/cynchrod \
    CYNCHROD_LISTEN=0.0.0.0:8080
# 0.0.0.0 is this container's own network namespace: publish it on the host's loopback
# (-p 127.0.0.1:8080:8080) or behind a proxy, never on every address of the host.
VOLUME /var/lib/cynchrod
WORKDIR /var/lib/cynchrod
USER cynchrod
EXPOSE 8080
# serve stops cleanly on SIGTERM (the API first, then the reconciler; apps keep running).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('CYNCHROD_LISTEN', ':8080').rpartition(':')[2]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["cynchrod"]
CMD ["serve"]
