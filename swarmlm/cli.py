"""`swarmlm dht | peer | generate | health | train | export | demo`: the command-line interface.

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


def _metrics_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; printed as "
                             "METRICS URL before READY)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="where /metrics listens (0.0.0.0: scrapable remotely)")


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
        update_period=args.update_period, throughput=args.throughput, balance_period=args.balance_period,
        balance_margin=args.balance_margin, direct=args.direct, direct_port=args.direct_port,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, training=_span_training_config(args),
    )
    peer = Peer(config, on_training_report=lambda report: print(report.line(), flush=True))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        _print_maddrs(peer.start_dht())
        peer.start()
        if peer.metrics_url:
            print(f"METRICS {peer.metrics_url}", flush=True)
        if peer.direct_address:
            print(f"DIRECT {peer.direct_address}", flush=True)
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


def _train_config(args):
    from swarmlm.training.config import DataConfig, TrainConfig

    data = DataConfig(
        sources=tuple(args.data), text_column=args.text_column, seq_len=args.seq_len, min_doc_chars=args.min_doc_chars,
        val_fraction=args.val_fraction, max_val_samples=args.max_val_samples, num_shards=args.num_shards,
        shard_index=args.shard_index, seed=args.seed,
    )
    return TrainConfig(
        run_id=args.run_id, model=args.model, data=data, num_layers=args.num_layers, seed=args.seed,
        batch_size=args.batch_size, target_batch_size=args.target_batch_size, epochs=args.epochs,
        min_peers=args.min_peers, lr=args.lr, weight_decay=args.weight_decay, local_updates=args.local_updates,
        average_state_every=args.average_state_every, matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout, save_dir=args.save, save_every=args.save_every,
        show_progress=not args.no_progress,
    )


def cmd_train(args) -> int:
    """Trains with the swarm; prints multiaddrs, [METRICS url,] READY, one EPOCH line per epoch and a final
    DONE {json} line."""
    import json

    import torch

    from swarmlm.dht.node import create_dht, shutdown_dht
    from swarmlm.training.data import prepare_data
    from swarmlm.training.lifetime import children_die_with_this_process
    from swarmlm.training.model import build_model
    from swarmlm.training.pretrain import Trainer
    from swarmlm.training.progress import epoch_line

    if not args.new_swarm and not args.initial_peers:
        raise ValueError("give --initial-peers MADDR ... to join a training run, or --new-swarm to start one")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ValueError(f"--metrics-port must lie in [0, 65535], got {args.metrics_port}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = _train_config(args)
    starting = build_model(config.model, config.seed, config.num_layers)
    data = prepare_data(config.data, starting.tokenizer)
    logging.getLogger("swarmlm").info(f"Data: {data.stats}")
    dht = create_dht([] if args.new_swarm else args.initial_peers, args.host_maddrs, args.announce_maddrs,
                     args.identity_path, use_nat_port_map=args.use_nat_port_map)
    children_die_with_this_process()  # the optimizer's averager processes, forked later, die with this trainer
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metrics = metrics_server = None
    try:
        _print_maddrs(dht.get_visible_maddrs())
        if args.metrics_port is not None:
            from swarmlm.monitoring.http_service import serve_metrics
            from swarmlm.monitoring.trainer_metrics import TrainerMetrics

            metrics = TrainerMetrics(config, dht)
            metrics_server = serve_metrics(metrics.registry, args.metrics_host, args.metrics_port)
            print(f"METRICS {metrics_server.url}/metrics", flush=True)
        print(f"{READY_LINE} run {config.run_id} shard {config.data.shard_index}/{config.data.num_shards} "
              f"({len(data.shard)} of {len(data.train)} samples)", flush=True)

        def on_epoch(stats) -> None:
            if metrics is not None:  # first: once the EPOCH line is out, /metrics shows that epoch
                metrics.observe_epoch(stats)
            print(epoch_line(stats), flush=True)

        trainer = Trainer(config, dht, starting, data, on_step=metrics.observe_step if metrics is not None else None,
                          on_epoch=on_epoch, stop=stop)
        result = trainer.run()
        summary = {key: value for key, value in result.to_dict().items() if key != "epochs"}
        print("DONE " + json.dumps(summary), flush=True)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        shutdown_dht(dht)
    return 0


def _span_training_config(args):
    """`swarmlm peer --train ...` -> SpanTrainingConfig (None without --train)."""
    from swarmlm.training.span_trainer import SpanTrainingConfig

    if not args.train:
        return None
    return SpanTrainingConfig(
        run_id=args.train_run_id, target_batch_size=args.target_batch_size, lr=args.lr,
        average_state_every=args.average_state_every, matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
    )


def cmd_export(args) -> int:
    """Writes the swarm's current blocks (+ the checkpoint's client tensors) as a checkpoint directory."""
    from swarmlm.training.export import export_model

    result = export_model(args.model, args.initial_peers, args.out, dht_prefix=args.dht_prefix)
    for source in result.sources:
        epoch = f"epoch {source.training_epoch}" if source.training_epoch is not None else "not training"
        print(f"blocks {source.start}:{source.end} from peer {source.peer_id} ({epoch})", flush=True)
    print(f"EXPORTED {result.path}", flush=True)
    return 0


def cmd_health(args) -> int:
    """Prints which peers serve each block of each model (exit 1 on a gap), or serves it as a web page."""
    import json

    from swarmlm.dht.node import create_dht, shutdown_dht
    from swarmlm.monitoring.health import collect_report, render_text

    dht = create_dht(args.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    try:
        if args.serve:
            from swarmlm.monitoring.page import serve_health_page

            with serve_health_page(dht, args.model, args.host, args.port, args.refresh) as page:
                print(f"{page.url}/", flush=True)
                print(READY_LINE, flush=True)
                _wait_for_signal()
            return 0
        report = collect_report(dht, args.model)
        print(json.dumps(report.to_dict(), indent=2) if args.json else render_text(report), flush=True)
        return 0 if report.healthy else 1
    finally:
        shutdown_dht(dht)


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
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="also serve inference sessions and pushed steps over plain, unencrypted TCP (no p2p daemon "
                        "on the path: less latency and CPU per token; for local swarms and trusted LANs; printed as "
                        "DIRECT HOST:PORT before READY). Default: on where every listen and announce address is "
                        "loopback (127.x), off otherwise")
    p.add_argument("--direct-port", type=int, default=0,
                   help="TCP port of direct connections when they are on (default: any free port)")
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
    p.add_argument("--balance-period", type=float, default=120.0,
                   help="with --num-blocks: seconds between checks whether moving would help the swarm")
    p.add_argument("--balance-margin", type=float, default=0.2,
                   help="move only if the swarm's weakest block gets this much faster (0.2 = 20%%)")
    _metrics_args(p)
    p.add_argument("--train", action="store_true",
                   help="train the hosted blocks: backward passes accumulate gradients, and the peers hosting the "
                        "same blocks average them and step together (needs --blocks; prints AVERAGING/EPOCH lines)")
    p.add_argument("--train-run-id", default="swarmlm",
                   help="with --train: replicas with the same run id train together")
    p.add_argument("--target-batch-size", type=int, default=64,
                   help="with --train: samples all replicas of the span process per epoch (one optimizer step)")
    p.add_argument("--lr", type=float, default=1e-4, help="with --train: AdamW learning rate")
    p.add_argument("--average-state-every", type=int, default=1,
                   help="with --train: average parameters and Adam statistics every N epochs")
    p.add_argument("--matchmaking-time", type=float, default=5.0,
                   help="with --train: seconds to wait for replicas to form an averaging group")
    p.add_argument("--averaging-timeout", type=float, default=30.0,
                   help="with --train: abandon an averaging round after this many seconds")
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

    p = sub.add_parser("train", help="pretrain a model together with the swarm (data-parallel, hivemind.Optimizer)")
    p.add_argument("--run-id", required=True, help="name of the training run: trainers with the same id train together")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="embedded model name (fresh seeded weights), checkpoint directory or config.json path")
    p.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    _network_args(p)
    p.add_argument("--num-layers", type=int, default=None, help="fresh models: override the number of layers")
    p.add_argument("--seed", type=int, default=0, help="weights of a fresh model and the shard's sample order")
    p.add_argument("--data", nargs="+", default=[],
                   help="text files, directories of text files or a datasets.save_to_disk directory "
                        "(default: Python's built-in help text)")
    p.add_argument("--text-column", default="text", help="the text column of a datasets directory")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sample")
    p.add_argument("--min-doc-chars", type=int, default=64, help="drop documents shorter than this after cleaning")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for validation")
    p.add_argument("--max-val-samples", type=int, default=64, help="held-out samples evaluated every epoch")
    p.add_argument("--num-shards", type=int, default=1, help="split the training samples into N disjoint shards")
    p.add_argument("--shard-index", type=int, default=0, help="train on shard K (sample i is in shard i %% N)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per local step")
    p.add_argument("--target-batch-size", type=int, default=256, help="samples the whole swarm processes per epoch")
    p.add_argument("--epochs", type=int, default=10, help="stop when the swarm reaches this epoch")
    p.add_argument("--min-peers", type=int, default=1, help="wait for this many trainers before the first step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--local-updates", action="store_true",
                   help="DiLoCo-style: local steps; parameters are averaged every --average-state-every epochs")
    p.add_argument("--average-state-every", type=int, default=1,
                   help="average parameters and Adam statistics every N epochs (--epochs must be a multiple)")
    p.add_argument("--matchmaking-time", type=float, default=5.0, help="seconds to wait for peers to form a group")
    p.add_argument("--averaging-timeout", type=float, default=60.0, help="abandon an averaging round after this")
    p.add_argument("--save", default=None, metavar="DIR", help="write the final checkpoint here (served by `peer`)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N epochs (0: only at the end)")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _metrics_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write the swarm's current (trained) blocks as a checkpoint directory")
    p.add_argument("--model", required=True, help="the model the peers serve (its checkpoint gives the config, "
                                                  "tokenizer, embeddings and head)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the checkpoint directory to write (replaced atomically)")
    p.add_argument("--dht-prefix", default=None, help="the model's name in the DHT (default: from --model)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("health", help="show which peers serve each block of each model; exit 1 if blocks are missing")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    p.add_argument("--model", nargs="*", default=None, help="models to check (default: all registered in the DHT)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--serve", action="store_true", help="serve a self-refreshing web page instead of printing")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: where the page listens")
    p.add_argument("--port", type=int, default=8080, help="with --serve: the page's port (0: any free port)")
    p.add_argument("--refresh", type=float, default=5.0, help="with --serve: seconds between page refreshes")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_health)

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
