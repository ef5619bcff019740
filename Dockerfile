# CPU image; for a GPU, install a CUDA build of torch first and run with --gpus all.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY . .
RUN make setup
ENV HF_HUB_OFFLINE=1 DREAMLOOM_DATA_DIR=/data
VOLUME /data
CMD ["make", "run"]
