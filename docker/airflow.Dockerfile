# Airflow 3 with the vtag project installed, CPU only: the API server, scheduler, DAG processor,
# triggerer, the CPU Celery worker and the airflow-init one-shot of docker/compose.yaml.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t vtag-airflow:0.1.0 .
# The base image's tag carries pyproject.toml's apache-airflow pin and requires-python (tests/test_docker.py checks both).
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
# The CPU build of torch (PyPI's default is the CUDA one, gigabytes of nvidia-* packages); every other
# package as constraints.txt pins it, the tree the tests ran against. The check stops the build if pip
# ever picked the CUDA wheel. /opt/airflow/auth: where airflow-init writes the login's password file (a
# named volume copies this folder's owner, so the airflow user can write there).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt \
        "torch==${TORCH_VERSION}" . \
    && python -c "import torch; assert torch.version.cuda is None, 'expected the CPU build of torch'" \
    && mkdir -p /opt/airflow/auth

COPY --chown=airflow:root docker/airflow_init.py /opt/vtag/airflow_init.py
COPY --chown=airflow:root dags /opt/airflow/dags
# the Video tags UI plugin: one shim, the pages come from the installed airflow_glue.ui
COPY --chown=airflow:root plugins /opt/airflow/plugins
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    VTAG_HOME=/opt/airflow/vtag
WORKDIR /opt/airflow
