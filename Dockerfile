# One image for every oncelery process (worker, beat, flower, sandbox, migrations);
# docker-compose.yml picks the command. Build: docker build -t oncelery .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer, read from pyproject.toml, so editing the code does not
# reinstall them. (psycopg[binary] ships wheels: no compiler or libpq needed.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY . .
RUN pip install .

# Not root: Celery warns against running workers as root, and a compromised step should not own
# the container. /data is created here, owned by that user, because an empty named volume
# mounted on it copies this ownership (a directory created by the volume would be root's).
RUN useradd --create-home --uid 10001 oncelery \
    && mkdir /data \
    && chown oncelery:oncelery /data
USER oncelery

ENV ONCELERY_DATA_DIR=/data

# sandbox provider, Flower
EXPOSE 8765 5555

CMD ["oncelery", "--help"]
