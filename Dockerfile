# pagechat: the chat UI, the OpenAI-compatible API and the engine in one process, on one NVIDIA GPU.
# Built and run by compose.yaml (`docker compose up -d`); the GPU comes from the NVIDIA Container Toolkit.
FROM python:3.12-slim

# gcc and libc headers: Triton compiles a small C launcher per kernel the first time it runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    PAGECHAT_DATA_DIR=/data

WORKDIR /srv/pagechat

# Dependencies first (torch, the largest, alone), so code changes do not reinstall them.
ARG TORCH_SPEC="torch>=2.6"
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt asyncpg \
    && rm /tmp/requirements.txt

# The app runs from its source tree: Chainlit reads chainlit.md, .chainlit/ and public/ from here.
COPY . .
RUN useradd --create-home --uid 1000 pagechat \
    && mkdir -p /data /cache/huggingface \
    && chown -R pagechat /data /cache /srv/pagechat
USER pagechat

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)"
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
