#!/usr/bin/env bash
# The test command (README.md): bash scripts/test.sh [pytest arguments...]
# Starts the services the tests use, installs the project with its dev extras, runs pytest.
#   ONCELERY_SKIP_INSTALL=1   skip the pip step (the environment is already set up)
#   TEST_DATABASE_URL / TEST_AMQP_URL / TEST_REDIS_URL   point the tests at other services
# Under CI=true a test whose service is unreachable fails instead of skipping (tests/conftest.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/services.sh

if [[ ${ONCELERY_SKIP_INSTALL:-0} != 1 ]]; then
    python3 -m pip install -q -e ".[dev]"
fi

# The same defaults as tests/conftest.py, which are what scripts/services.sh sets up.
: "${TEST_DATABASE_URL:=postgresql+psycopg://oncelery:oncelery@127.0.0.1:5432/oncelery}"
: "${TEST_AMQP_URL:=amqp://guest:guest@127.0.0.1:5672//}"
: "${TEST_REDIS_URL:=redis://127.0.0.1:6379/1}"
export TEST_DATABASE_URL TEST_AMQP_URL TEST_REDIS_URL

# Two test processes (pytest-xdist), each with brokers of its own (tests/conftest.py): the
# system tests mostly wait on their workers, so two at a time fit two cores. Work stealing:
# tests last from milliseconds to a minute, and a process that runs out takes from the other
# rather than idling at the end. Pass `-n 0` to run in one process.
exec python3 -m pytest -n "${TEST_PROCESSES:-2}" --dist worksteal "$@"
