#!/bin/sh
# Entry point of the stagetune images: turns each secret given as a file into the variable
# the program reads, then runs the command (`stagetune serve`, `stagetune worker`,
# `mlflow server`, `optuna-dashboard`).
#
# For each NAME below, NAME_FILE=/run/secrets/x sets NAME to that file's content (trailing
# newlines dropped), the convention of Docker's official images (POSTGRES_PASSWORD_FILE).
# A password thus reaches the process environment but never the compose file, the image,
# a pod spec or the process list. Only these names: a variable such as SSL_CERT_FILE
# means a path and must stay one.
#
# Exit status 2 (the CLI's status for a configuration error) when a file cannot be read or
# when both NAME and NAME_FILE are set.
set -eu

for name in STAGETUNE_STORAGE STAGETUNE_TRACKING_URI STAGETUNE_TOKEN PGPASSWORD \
    MLFLOW_BACKEND_STORE_URI MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD \
    MLFLOW_TRACKING_TOKEN AWS_SECRET_ACCESS_KEY; do
    eval "file=\${${name}_FILE:-}"
    [ -n "$file" ] || continue
    eval "value=\${${name}:-}"
    if [ -n "$value" ]; then
        echo "stagetune-entrypoint: both $name and ${name}_FILE are set; keep one" >&2
        exit 2
    fi
    if [ ! -r "$file" ]; then
        echo "stagetune-entrypoint: ${name}_FILE: cannot read $file" >&2
        exit 2
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done

exec "$@"
