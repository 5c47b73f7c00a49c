FROM python:3.11-slim
ARG ENGINE=none
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml package.json README.md ./
COPY . .
RUN if [ "$ENGINE" = "none" ]; then pip install --no-cache-dir -e . ; else pip install --no-cache-dir -e ".[$ENGINE]"; fi \
    && npm install --no-audit --no-fund --omit=dev \
    && DATABASE_URL=sqlite:////tmp/build.db SECRET_KEY=build python manage.py collectstatic --no-input
ENV PYTHONUNBUFFERED=1
EXPOSE 8000 8080
