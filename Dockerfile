# The Eventflow image: one image for the web app, the workers, beat and the one-shot migrate job.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production

WORKDIR /app

# Dependencies first, so that a change of code alone does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# The project's own files, named one by one so that no local virtualenv, database or cache
# ends up in the image.
COPY manage.py ./
COPY config/ config/
COPY events_app/ events_app/
COPY workflows_app/ workflows_app/
COPY templates/ templates/
COPY examples/ examples/

# Static files are collected at build time into STATIC_ROOT (var/static). Production settings
# refuse to load without their secrets, so this one step gets placeholders that are not kept in
# the image; nothing connects to the database or the broker while collecting.
RUN SECRET_KEY=collectstatic-only \
    ALLOWED_HOSTS=localhost \
    DATABASE_URL=postgres://collectstatic@localhost/collectstatic \
    CELERY_BROKER_URL=memory:// \
    python manage.py collectstatic --noinput

RUN useradd --system --no-create-home --uid 10001 eventflow
USER eventflow

EXPOSE 8000
CMD ["gunicorn", "config.wsgi:application", "-b", "0.0.0.0:8000", "-w", "3", "--access-logfile", "-"]
