#!/bin/bash
# Run once by the postgres image, when it initialises an empty data volume (/docker-entrypoint-initdb.d):
# two databases with an owner each, Airflow's metadata (airflow) and ours, the predictions (vtag). The
# vtag role may create roles: migration 0003 creates the analysts' role vtag_analyst.
# Passwords come from docker/.env through compose; changing them there later does not change these
# roles (ALTER ROLE ... PASSWORD, or start over with `docker compose -f docker/compose.yaml down -v`).
# No `set -u` here: the image sources a script that lost its executable bit into its own entrypoint.
# psql's exit status is the script's.
psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v airflow_password="$AIRFLOW_ROLE_PASSWORD" -v vtag_password="$PREDICTIONS_ROLE_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
CREATE ROLE vtag LOGIN CREATEROLE PASSWORD :'vtag_password';
CREATE DATABASE vtag OWNER vtag;
SQL
