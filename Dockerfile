# The Tessera image that clusters/kuberay_*.yaml and ray_cluster.yaml name
# (registry.example.com/tessera:0.1.0; the tag is the version in pyproject.toml):
#
#   docker build -t registry.example.com/tessera:0.1.0 .
#   docker push registry.example.com/tessera:0.1.0
#
# Base: the PyTorch project's CUDA runtime image for torch 2.13.0 (CUDA 13.0, cuDNN 9, on Ubuntu,
# with python and pip on its PATH). torch stays the base's build: the install below is constrained
# to it, so pip never swaps in another torch. Another CUDA torch in 2.11-2.13 works too
# (--build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<cuda>-cudnn9-runtime); the host driver must
# support the image's CUDA version.
#
# The image follows what KubeRay and the Ray cluster launcher expect of a Ray image: Ray installed
# (ray[default], the version the manifests' rayVersion names); a non-root `ray` user (uid 1000,
# gid 100, as in Ray's own images; a base that already has a uid-1000 user loses that user) with
# its home in /home/ray; bash (KubeRay starts `ray start` through bash); wget (KubeRay's readiness
# and liveness probes query the raylet's and the GCS's health endpoints with it); rsync (the
# cluster launcher syncs files into the container with it).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

# Stage 1: the wheel, built from the repository copy (what .dockerignore lets through).
FROM ${BASE_IMAGE} AS wheel
COPY . /src
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels /src

# Stage 2: the runtime image.
FROM ${BASE_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bash wget rsync ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (getent group 100 >/dev/null || groupadd --gid 100 users) \
 && old="$(getent passwd 1000 | cut -d: -f1)" && if [ -n "$old" ]; then userdel --remove "$old"; fi \
 && useradd --create-home --home-dir /home/ray --shell /bin/bash --uid 1000 --gid 100 ray

# Tessera with the GPU and Comet extras, from the wheel (not an editable install), on top of the
# base's torch.
COPY --from=wheel /wheels /tmp/wheels
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && python -m pip install --no-cache-dir --constraint /tmp/torch-constraint.txt \
        "$(ls /tmp/wheels/tessera-*.whl)[gpu,comet]" \
 && COMET_DISABLE_AUTO_LOGGING=1 COMET_ERROR_TRACKING_ENABLE=false python -c \
        "import ray, torch, diffusers, accelerate, comet_ml; print(ray.__version__, torch.__version__)" \
 && rm -rf /tmp/wheels /tmp/torch-constraint.txt

# The repository copy is also the working directory: RayJob entrypoints name job files under
# clusters/ relative to it, and the built-in models (models/reference, models/taef2, models/lpips)
# are found beside core/ and runner/ in this tree. A Ray job without a runtime_env working_dir
# starts its driver in the directory `ray start` ran in (this one) and puts it first on every
# worker's sys.path, so drivers and workers import this copy, the same code as the wheel.
ENV HOME=/home/ray
WORKDIR /home/ray/tessera
COPY --chown=1000:100 . /home/ray/tessera

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 1000:100
CMD ["bash"]
