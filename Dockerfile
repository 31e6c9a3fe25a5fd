# A swarmlm volunteer peer.
#   docker build -t swarmlm .
#   docker run --rm -p 31337:31337 -v ~/.cache/huggingface:/root/.cache/huggingface swarmlm \
#       --model swarmlm-tiny-llama --num-blocks 4 --initial-peers /ip4/HOST/tcp/PORT/p2p/PEERID \
#       --host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/PUBLIC_IP/tcp/31337
# GPU hosts: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 and run with --gpus all --device cuda.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/swarmlm
COPY pyproject.toml README.md ./
COPY swarmlm ./swarmlm
RUN pip install --no-cache-dir .

EXPOSE 31337
ENTRYPOINT ["swarmlm", "peer"]
CMD ["--model", "swarmlm-tiny-llama", "--num-blocks", "4", "--new-swarm", "--host-maddrs", "/ip4/0.0.0.0/tcp/31337"]
