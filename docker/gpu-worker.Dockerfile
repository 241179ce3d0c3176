# The GPU Celery worker of docker/compose.yaml (`airflow celery worker --queues gpu`): the same Airflow,
# project and DAGs as docker/airflow.Dockerfile, with the CUDA build of torch.
# Build from the repository root:  docker build -f docker/gpu-worker.Dockerfile -t vtag-gpu-worker:0.1.0 .
#
# Why the Airflow image and not an nvidia/cuda one: PyPI's torch wheel is the CUDA build and brings the
# CUDA runtime, cuDNN, cuBLAS and NCCL with it as nvidia-* pip packages; the one piece it lacks, the
# driver (libcuda.so), belongs to the host and is mounted in at run time by the NVIDIA Container Toolkit
# when the container is given a GPU (compose's device reservation, `docker run --gpus`). So the worker
# runs exactly the Airflow and Python of the other services, which a CUDA base image would not give.
# The host needs an NVIDIA driver recent enough for the CUDA version of the torch wheel.
FROM apache/airflow:3.3.2-python3.11

# pyproject.toml's torch pin, stated here so that the build fails if the two ever disagree.
ARG TORCH_VERSION=2.13.0

# The airflow user must own the source folder: pip builds the project in it (build/, *.egg-info), and
# WORKDIR alone makes a root-owned folder under the legacy builder. 50000: the image's airflow user.
USER 0
RUN install -d -o airflow -g root /opt/vtag
USER 50000
WORKDIR /opt/vtag
COPY --chown=airflow:root pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:root tasks ./tasks
COPY --chown=airflow:root airflow_glue ./airflow_glue
COPY --chown=airflow:root storage ./storage
COPY --chown=airflow:root model ./model
COPY --chown=airflow:root sql ./sql
# torch and its nvidia-* packages from PyPI (torch pins those exactly); every other package as
# constraints.txt pins it. The check stops the build if pip picked a wheel without CUDA.
RUN pip install --no-cache-dir -c constraints.txt "torch==${TORCH_VERSION}" . \
    && python -c "import torch; assert torch.version.cuda, 'expected the CUDA build of torch'"

COPY --chown=airflow:root dags /opt/airflow/dags
# the Video tags UI plugin: one shim, the pages come from the installed airflow_glue.ui
COPY --chown=airflow:root plugins /opt/airflow/plugins
# compute: CUDA; utility: nvidia-smi. Read by the NVIDIA Container Toolkit.
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    VTAG_HOME=/opt/airflow/vtag \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/airflow
