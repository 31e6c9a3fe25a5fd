"""`swarmlm dht | peer | generate | demo`: the command-line interface.

Every node prints its full multiaddrs on stdout, one per line, then a line "READY"; scripts and
tests wait for that line instead of sleeping.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

READY_LINE = "READY"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("hivemind", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _wait_for_signal() -> None:
    """Blocks until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _print_maddrs(maddrs) -> None:
    for maddr in maddrs:
        print(maddr, flush=True)


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocks must look like A:B (e.g. 0:4), got {text!r}") from None
    return start, end


def _network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of any swarm members")
    parser.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"],
                        help="where to listen (e.g. /ip4/0.0.0.0/tcp/31337 for a public peer)")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs to announce")
    parser.add_argument("--identity-path", default=None, help="private key file: a stable peer id across restarts")
    parser.add_argument("--use-nat-port-map", action="store_true",
                        help="ask the gateway for a port mapping (NAT-PMP/UPnP); off by default")
    parser.add_argument("--log-level", default="info")


def cmd_dht(args) -> int:
    from swarmlm.dht.node import create_dht, shutdown_dht

    dht = create_dht(args.initial_peers, args.host_maddrs, args.announce_maddrs, args.identity_path,
                     use_nat_port_map=args.use_nat_port_map)
    _print_maddrs(dht.get_visible_maddrs())
    print(READY_LINE, flush=True)
    try:
        _wait_for_signal()
    finally:
        shutdown_dht(dht)
    return 0


def cmd_peer(args) -> int:
    from swarmlm.peer.config import PeerConfig
    from swarmlm.peer.server import Peer

    config = PeerConfig(
        model=args.model, blocks=args.blocks, num_blocks=args.num_blocks, initial_peers=args.initial_peers,
        new_swarm=args.new_swarm, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
        identity_path=args.identity_path, use_nat_port_map=args.use_nat_port_map, dht_prefix=args.dht_prefix,
        public_name=args.public_name, device=args.device, torch_dtype=args.torch_dtype, num_threads=args.num_threads,
        max_cache_tokens=args.max_cache_tokens, max_batch_size=args.max_batch_size,
        request_timeout=args.request_timeout, session_timeout=args.session_timeout,
        update_period=args.update_period, throughput=args.throughput,
    )
    peer = Peer(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _print_maddrs(peer.start_dht())
        peer.start()
        print(f"{READY_LINE} blocks {peer.span.start}:{peer.span.end} of {peer.model_name}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        peer.shutdown()
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from swarmlm.client.model import AutoDistributedModelForCausalLM
    from swarmlm.models.checkpoint import resolve_model

    resolved = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            dht_prefix=args.dht_prefix)
    try:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        streamer = TextStreamer(tokenizer)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or None, streamer=streamer,
                           pad_token_id=tokenizer.pad_token_id)
    finally:
        model.close()
    return 0


def cmd_demo(args) -> int:
    from swarmlm.demo import run_demo

    import torch

    torch.set_num_threads(1)
    return run_demo(num_peers=args.num_peers, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                     model=args.model)


def build_parser() -> argparse.ArgumentParser:
    from swarmlm.models.embedded import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="swarmlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dht", help="start a bootstrap DHT node and print its multiaddrs")
    _network_args(p)
    p.set_defaults(func=cmd_dht)

    p = sub.add_parser("peer", help="host a span of a model's blocks for the swarm")
    p.add_argument("--model", required=True, help="embedded model name, checkpoint directory or HF repo id")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--blocks", type=_blocks, help="serve blocks A:B (A inclusive, B exclusive)")
    group.add_argument("--num-blocks", type=int, help="serve N blocks where the swarm is weakest")
    p.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    _network_args(p)
    p.add_argument("--dht-prefix", default=None, help="the model's name in the DHT (default: from --model)")
    p.add_argument("--public-name", default=None, help="a name shown in health reports")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--max-cache-tokens", type=int, default=16384,
                   help="KV-cache budget: sum of batch x max_length over open sessions")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds one step may take")
    p.add_argument("--session-timeout", type=float, default=300.0, help="idle seconds before a session is closed")
    p.add_argument("--update-period", type=float, default=30.0, help="seconds between DHT announcements")
    p.add_argument("--throughput", type=float, default=None, help="announced tokens/s per block (default: measure)")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("generate", help="generate text through a running swarm")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--dht-prefix", default=None)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="run a whole local swarm on the embedded model and generate through it")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num-peers", type=int, default=2)
    p.add_argument("--prompt", default="The Python language reference says that")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from swarmlm.errors import SwarmError

        if isinstance(e, (SwarmError, ValueError)):
            logging.getLogger("swarmlm").error(str(e))
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
