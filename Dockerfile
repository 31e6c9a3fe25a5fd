# A swarmlm volunteer peer, with the tested dependency set (requirements.lock, hash-checked).
#   docker build -t swarmlm .
#   docker run --rm -p 31337:31337 -v ~/.cache/huggingface:/root/.cache/huggingface swarmlm \
#       --model swarmlm-tiny-llama --num-blocks 4 --initial-peers /ip4/HOST/tcp/PORT/p2p/PEERID \
#       --host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/PUBLIC_IP/tcp/31337
# torch is the CPU build by default; GPU hosts: build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# and run with --gpus all --device cuda.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /opt/swarmlm
COPY pyproject.toml README.md requirements.lock ./
COPY scripts ./scripts
COPY swarmlm ./swarmlm
RUN PYTHON=python TORCH_INDEX="${TORCH_INDEX}" bash scripts/install.sh && rm -rf /root/.cache/pip

EXPOSE 31337
ENTRYPOINT ["swarmlm", "peer"]
CMD ["--model", "swarmlm-tiny-llama", "--num-blocks", "4", "--new-swarm", "--host-maddrs", "/ip4/0.0.0.0/tcp/31337"]
