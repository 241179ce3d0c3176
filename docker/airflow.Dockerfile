# Airflow 3 with the vtag project installed, CPU only: scheduler, API server, DAG processor, CPU workers.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t vtag-airflow .
FROM apache/airflow:3.3.2-python3.11

WORKDIR /opt/vtag
COPY --chown=airflow:root pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:root tasks ./tasks
COPY --chown=airflow:root storage ./storage
COPY --chown=airflow:root model ./model
COPY --chown=airflow:root sql ./sql
# The CPU build of torch (PyPI's default is the CUDA one); every other package as constraints.txt pins it.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt .

COPY --chown=airflow:root dags /opt/airflow/dags
ENV AIRFLOW__CORE__LOAD_EXAMPLES=False \
    VTAG_HOME=/opt/airflow/vtag
WORKDIR /opt/airflow
