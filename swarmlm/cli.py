"""`swarmlm dht | peer | generate | health | train | export | demo`: the command-line interface.

Every node prints its full multiaddrs on stdout, one per line, then a line "READY"; scripts and
tests wait for that line instead of sleeping.

The flags come from the config dataclasses (`command_flags`, swarmlm.settings): each setting is declared once,
with its help, default and env var; `dht`, `peer` and `train` also read a TOML file (--config).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field

from swarmlm.settings import Flags, Settings, setting

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


NETWORK = ("initial_peers", "host_maddrs", "announce_maddrs", "identity_path", "swarm_key", "use_nat_port_map")
METRICS = ("metrics_port", "metrics_host")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PRECEDENCE = ("A setting with an env var (shown in its help) is taken from the first of: its flag, its env var, the "
              "--config file (where the command takes one), its default.")


@dataclass
class CommandSettings:
    """Settings of the commands themselves (not of a peer or a trainer)."""

    log_level: str = field(default="info", metadata=setting("what to log on stderr", choices=LOG_LEVELS,
                                                            parse=str.lower))
    train: bool = field(default=False, metadata=setting(
        "train the hosted blocks: backward passes accumulate gradients, and the peers hosting the same blocks "
        "average them and step together (needs blocks; prints AVERAGING/EPOCH lines; see the training settings)"))


def command_flags() -> dict[str, list[Flags]]:
    """The settings each command takes. A setting that several commands take comes from one declaration (one
    `Flags` group), so its flag, help and env var are the same in all of them."""
    from swarmlm.models.embedded import DEFAULT_MODEL
    from swarmlm.peer.config import PeerConfig, SpanTrainingConfig
    from swarmlm.training.config import DataConfig, TrainConfig

    network = Flags(PeerConfig, only=NETWORK, title="network")
    metrics = Flags(PeerConfig, only=METRICS, title="metrics")
    client = Flags(PeerConfig, only=("initial_peers", "dht_prefix", "swarm_key"))
    logging_info = Flags(CommandSettings, only=("log_level",), title="logging")
    logging_warning = Flags(CommandSettings, only=("log_level",), title="logging", defaults={"log_level": "warning"})
    return {
        "dht": [network, logging_info],
        "peer": [Flags(PeerConfig, exclude=NETWORK + METRICS), network, metrics,
                 Flags(CommandSettings, only=("train",), title="training"),
                 Flags(SpanTrainingConfig, section="training", title="training"), logging_info],
        "train": [Flags(TrainConfig, defaults={"model": DEFAULT_MODEL}),
                  Flags(PeerConfig, only=("new_swarm", "num_threads")), Flags(DataConfig, section="data", title="data"),
                  network, metrics, logging_info],
        "generate": [client, logging_warning],
        "export": [client, logging_warning],
        "health": [Flags(PeerConfig, only=("initial_peers", "swarm_key")), logging_warning],
        "demo": [logging_warning],
        "swarm-key": [logging_warning],
    }


def _start_dht(s: Settings, initial_peers: list[str], protected=None):
    from swarmlm.dht.node import create_dht
    from swarmlm.utils.swarm_key import load_swarm_key

    return create_dht(initial_peers, s["host_maddrs"], s["announce_maddrs"], s["identity_path"],
                      use_nat_port_map=s["use_nat_port_map"], protected=protected or {},
                      swarm_key=load_swarm_key(s["swarm_key"]))


def _initial_peers(s: Settings) -> list[str]:
    if not s["initial_peers"]:
        raise ValueError("give --initial-peers MADDR ...: multiaddrs of any swarm members (printed by swarmlm "
                         "dht/peer)")
    return s["initial_peers"]


def cmd_dht(args, s: Settings) -> int:
    from swarmlm.dht.node import shutdown_dht

    dht = _start_dht(s, s["initial_peers"])
    _print_maddrs(dht.get_visible_maddrs())
    print(READY_LINE, flush=True)
    try:
        _wait_for_signal()
    finally:
        shutdown_dht(dht)
    return 0


def cmd_swarm_key(args, s: Settings) -> int:
    from swarmlm.utils.swarm_key import SwarmKey

    key = SwarmKey.generate(args.path)
    print(f"Wrote a new swarm key to {args.path} (fingerprint {key.fingerprint}); every member of the private swarm "
          f"needs a copy: --swarm-key {args.path}", flush=True)
    return 0


def peer_config(s: Settings):
    """The PeerConfig of `swarmlm peer` (its training settings only with --train)."""
    from swarmlm.peer.config import PeerConfig, SpanTrainingConfig

    training = SpanTrainingConfig(**s.of(SpanTrainingConfig)) if s["train"] else None
    return PeerConfig(**s.of(PeerConfig), training=training)


def cmd_peer(args, s: Settings) -> int:
    from swarmlm.training.peer import make_peer

    config = peer_config(s)
    peer = make_peer(config, on_training_report=lambda report: print(report.line(), flush=True))
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
        while not stop.wait(1.0) and not peer.stopped.is_set():
            pass
    finally:
        peer.shutdown()
    if peer.failure is not None:
        logging.getLogger("swarmlm").error(f"Peer stopped: {peer.failure}")
        return 1
    return 0


def cmd_generate(args, s: Settings) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from swarmlm.client.model import AutoDistributedModelForCausalLM
    from swarmlm.models.checkpoint import resolve_model

    resolved = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=_initial_peers(s),
                                                            dht_prefix=s["dht_prefix"], swarm_key=s["swarm_key"])
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


def train_config(s: Settings):
    """The TrainConfig of `swarmlm train` (--seed seeds both the weights and the shard's sample order)."""
    from swarmlm.training.config import DataConfig, TrainConfig

    train = s.of(TrainConfig)
    return TrainConfig(**train, data=DataConfig(**s.of(DataConfig), seed=train["seed"]))


def cmd_train(args, s: Settings) -> int:
    """Trains with the swarm; prints multiaddrs, [METRICS url,] READY, one EPOCH line per epoch and a final
    DONE {json} line."""
    import json

    import torch

    from swarmlm.dht.node import shutdown_dht
    from swarmlm.training.data import prepare_data
    from swarmlm.utils.lifetime import children_die_with_this_process
    from swarmlm.training.model import build_model
    from swarmlm.training.checkpoint import check_replaceable
    from swarmlm.training.pretrain import Trainer
    from swarmlm.training.progress import epoch_line

    if not s["new_swarm"] and not s["initial_peers"]:
        raise ValueError("give --initial-peers MADDR ... to join a training run, or --new-swarm to start one")
    if s["metrics_port"] is not None and not 0 <= s["metrics_port"] <= 65535:
        raise ValueError(f"--metrics-port must lie in [0, 65535], got {s['metrics_port']}")
    if s["num_threads"]:
        torch.set_num_threads(s["num_threads"])
    config = train_config(s)
    if config.save_dir:  # now, not after the training: a save there would be refused
        check_replaceable(config.save_dir, remedy="give --save another directory (or an empty one)")
    starting = build_model(config.model, config.seed, config.num_layers)
    data = prepare_data(config.data, starting.tokenizer)
    logging.getLogger("swarmlm").info(f"Data: {data.stats}")
    from swarmlm.dht.records import TRAINER_SUBKEY_TAG, roster_key

    dht = _start_dht(s, [] if s["new_swarm"] else s["initial_peers"], {roster_key(config.run_id): TRAINER_SUBKEY_TAG})
    children_die_with_this_process()  # the optimizer's averager processes, forked later, die with this trainer
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    metrics = metrics_server = None
    try:
        _print_maddrs(dht.get_visible_maddrs())
        if s["metrics_port"] is not None:
            from swarmlm.monitoring.http_service import serve_metrics
            from swarmlm.training.metrics import TrainerMetrics

            metrics = TrainerMetrics(config, dht)
            metrics_server = serve_metrics(metrics.registry, s["metrics_host"], s["metrics_port"])
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


def cmd_export(args, s: Settings) -> int:
    """Writes the swarm's current blocks (+ the checkpoint's client tensors) as a checkpoint directory."""
    from swarmlm.training.export import export_model

    result = export_model(args.model, _initial_peers(s), args.out, dht_prefix=s["dht_prefix"], overwrite=args.overwrite,
                          swarm_key=s["swarm_key"])
    for source in result.sources:
        epoch = f"epoch {source.training_epoch}" if source.training_epoch is not None else "not training"
        print(f"blocks {source.start}:{source.end} from peer {source.peer_id} ({epoch})", flush=True)
    print(f"EXPORTED {result.path}", flush=True)
    return 0


def cmd_health(args, s: Settings) -> int:
    """Prints which peers serve each block of each model (exit 1 on a gap), or serves it as a web page."""
    import json

    from swarmlm.dht.node import create_dht, shutdown_dht
    from swarmlm.utils.swarm_key import load_swarm_key
    from swarmlm.monitoring.health import collect_report, render_text

    dht = create_dht(_initial_peers(s), ["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                     swarm_key=load_swarm_key(s["swarm_key"]))
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


def cmd_demo(args, s: Settings) -> int:
    from swarmlm.demo import run_demo

    import torch

    torch.set_num_threads(1)
    return run_demo(num_peers=args.num_peers, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
                     model=args.model)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each parsed namespace carries `func` and `flags` (its settings' groups)."""
    from swarmlm.models.embedded import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="swarmlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    flags = command_flags()

    def command(name: str, func, help: str, config: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=PRECEDENCE)
        if config:
            sections = ", ".join(f"[{g.section}]" for g in flags[name] if g.section)
            p.add_argument("--config", metavar="FILE.toml", help=(
                "read settings from this TOML file: keys are the flags' names (with dashes or underscores)"
                f"{f', at the top level or in {sections}' if sections else ''}; flags and env vars override it"
                f"{' (example: examples/peer.toml)' if name == 'peer' else ''}"))
        for group in flags[name]:
            group.add_to(p)
        p.set_defaults(func=func, flags=flags[name])
        return p

    command("dht", cmd_dht, "start a bootstrap DHT node and print its multiaddrs", config=True)
    p = command("swarm-key", cmd_swarm_key, "write a new swarm key file for a private swarm (give it to every "
                                            "member: --swarm-key FILE)")
    p.add_argument("path", metavar="FILE", help="where to write the key (refused if the file exists)")
    command("peer", cmd_peer, "host a span of a model's blocks for the swarm", config=True)

    p = command("generate", cmd_generate, "generate text through a running swarm")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model the peers serve (default: %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")

    command("train", cmd_train, "pretrain a model together with the swarm (data-parallel, hivemind.Optimizer)",
            config=True)

    p = command("export", cmd_export, "write the swarm's current (trained) blocks as a checkpoint directory")
    p.add_argument("--model", required=True, help="the model the peers serve (its checkpoint gives the config, "
                                                  "tokenizer, embeddings and head)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the checkpoint directory to write (replaced atomically; a directory with files a save "
                        "would not write is refused, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR even if it holds files a save would not write (they are deleted)")

    p = command("health", cmd_health, "show which peers serve each block of each model; exit 1 if blocks are missing")
    p.add_argument("--model", nargs="*", default=None, help="models to check (default: all registered in the DHT)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--serve", action="store_true", help="serve a self-refreshing web page instead of printing")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: where the page listens")
    p.add_argument("--port", type=int, default=8080, help="with --serve: the page's port (0: any free port)")
    p.add_argument("--refresh", type=float, default=5.0, help="with --serve: seconds between page refreshes")

    p = command("demo", cmd_demo, "run a whole local swarm on the embedded model and generate through it")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--num-peers", type=int, default=2)
    p.add_argument("--prompt", default="The Python language reference says that")
    p.add_argument("--max-new-tokens", type=int, default=32)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings(args, args.flags, config=getattr(args, "config", None))
        _setup_logging(settings["log_level"])
        return args.func(args, settings)
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
