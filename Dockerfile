# freshrec: one image for every role (trainer, serving, producer, joiner).
FROM python:3.11-slim

WORKDIR /app
# The CPU build of torch, pinned as in pyproject.toml (the default index serves a CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY freshrec freshrec
COPY stream stream
COPY trainer trainer
COPY publisher publisher
COPY serving serving
COPY ops ops
RUN pip install --no-cache-dir .

RUN useradd --create-home freshrec
USER freshrec
ENTRYPOINT ["freshrec"]
CMD ["--help"]
