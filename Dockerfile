# icu-forecast: one image for the pipeline (`icu-forecast dag run`) and the API
# (`icu-forecast serve`). CPU-only torch: the default PyPI wheel pulls gigabytes of CUDA.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# torch first, from the CPU index, in its own layer so code changes do not re-download it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY features ./features
COPY pipeline ./pipeline
COPY training ./training
COPY service ./service
RUN pip install .

# Non-root; /app/data holds the ETL output and the DAG state (a named volume in compose).
RUN useradd --create-home --uid 10001 app && mkdir -p /app/data && chown app /app /app/data
USER app

EXPOSE 8000
ENTRYPOINT ["icu-forecast"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
