# The platform's own image, for compose.yaml (people with a registry): CLI, nodes, API, Flower.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY orchestrator orchestrator
COPY workers workers
RUN pip install --no-cache-dir .
ENTRYPOINT ["orchestrator"]
