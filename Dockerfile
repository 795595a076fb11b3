# One image for every oncelery process (worker, beat, flower, sandbox, migrations);
# docker-compose.yml picks the command. Build: docker build -t oncelery .
# A patch release on a fixed Debian release: a rebuild gets the same Python and libc.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer, from the lock file (every version pinned, every file's
# hash checked), so editing the code does not reinstall them and a rebuild installs what the
# tests ran against. psycopg[binary] ships wheels: no compiler or libpq needed.
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock

COPY . .
# --no-deps: the lock installed them; a dependency missing from it fails `pip check`.
RUN pip install --no-deps . && pip check

# Not root: Celery warns against running workers as root, and a compromised step should not own
# the container. /data is created here, owned by that user, because an empty named volume
# mounted on it copies this ownership (a directory created by the volume would be root's).
RUN useradd --create-home --uid 10001 oncelery \
    && mkdir /data \
    && chown oncelery:oncelery /data
USER oncelery

ENV ONCELERY_DATA_DIR=/data

# sandbox provider, Flower, the HTTP intake
EXPOSE 8765 5555 8000

CMD ["oncelery", "--help"]
