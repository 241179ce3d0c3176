#!/bin/sh
# Entrypoint of the postgres service of docker/compose.yaml: checks the passwords, then hands over to the
# postgres image's own entrypoint. PostgreSQL keeps the role passwords it is first initialised with (on
# an empty volume), so a placeholder left from docker/.env.example, or a password that cannot stand
# unescaped in the connection URLs compose builds, is refused before anything is written.
# Each pair: the container's variable, and the docker/.env variable it comes from.
set -eu
for pair in POSTGRES_PASSWORD:POSTGRES_PASSWORD AIRFLOW_ROLE_PASSWORD:AIRFLOW_DB_PASSWORD \
            PREDICTIONS_ROLE_PASSWORD:VTAG_DB_PASSWORD; do
    name=${pair%%:*} dotenv=${pair#*:}
    eval "value=\${$name:-}"
    case "$value" in
        "")
            echo "postgres: $dotenv is empty: set it in docker/.env" >&2; exit 1 ;;
        *change-me*)
            echo "postgres: $dotenv in docker/.env still holds the placeholder of docker/.env.example: set a real password" >&2; exit 1 ;;
        *[!A-Za-z0-9._~-]*)
            echo "postgres: $dotenv may hold only letters, digits and . _ ~ - (it goes into URLs unescaped), e.g. openssl rand -hex 24" >&2; exit 1 ;;
    esac
done
exec docker-entrypoint.sh "$@"
