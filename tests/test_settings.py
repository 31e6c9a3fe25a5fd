"""swarmlm.settings and the CLI's flags: one declaration per setting, its default, env var and config file key."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

import pytest

from swarmlm.cli import NETWORK, CommandSettings, build_parser, main, peer_config, train_config
from swarmlm.peer.config import PeerConfig, SpanTrainingConfig
from swarmlm.settings import Flags, Settings, setting
from swarmlm.training.config import DataConfig, TrainConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "peer.toml"
CONFIGS = [PeerConfig, SpanTrainingConfig, TrainConfig, DataConfig, CommandSettings]
NOT_SETTINGS = {"PeerConfig": {"training"}, "TrainConfig": {"data"}, "DataConfig": {"seed"}}  # nested / from --seed


def parse(*argv: str, env: Optional[dict] = None) -> Settings:
    args = build_parser().parse_args(list(argv))
    return Settings(args, args.flags, config=getattr(args, "config", None), env=env or {})


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_every_field_is_a_flag_whose_default_is_the_dataclass_default(cls):
    group = Flags(cls)
    names = {option.name for option in group.options}
    assert names == {f.name for f in dataclasses.fields(cls)} - NOT_SETTINGS.get(cls.__name__, set())
    parser = argparse.ArgumentParser()
    group.add_to(parser)
    assert {a.dest for a in parser._actions} - {"help"} == names
    optional = Flags(cls, exclude=[option.name for option in group.options if option.required])
    resolved = Settings(parser.parse_args([]), [optional], env={})
    for f in dataclasses.fields(cls):
        if f.name in resolved.values:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert resolved[f.name] == default, f.name
    assert all(option.flag == "--" + option.name.replace("_", "-") or option.declared.flag for option in group.options)


def test_peer_keeps_the_flags_users_know():
    peer = {s for a in subparsers()["peer"]._actions for s in a.option_strings}
    assert {"--model", "--blocks", "--num-blocks", "--new-swarm", "--initial-peers", "--host-maddrs",
            "--announce-maddrs", "--identity-path", "--use-nat-port-map", "--dht-prefix", "--public-name", "--direct",
            "--no-direct", "--direct-port", "--device", "--torch-dtype", "--num-threads", "--max-cache-tokens",
            "--max-batch-size", "--request-timeout", "--session-timeout", "--update-period", "--throughput",
            "--balance-period", "--balance-margin", "--metrics-port", "--metrics-host", "--train", "--run-id",
            "--target-batch-size", "--lr", "--average-state-every", "--matchmaking-time", "--averaging-timeout",
            "--log-level", "--config"} <= peer
    train = {s for a in subparsers()["train"]._actions for s in a.option_strings}
    assert {"--run-id", "--data", "--save", "--save-every", "--no-progress", "--seed", "--local-updates",
            "--num-shards", "--shard-index", "--new-swarm", "--initial-peers", "--metrics-port", "--config"} <= train


def test_flags_build_the_same_configs_as_before():
    config = peer_config(parse("peer", "--model", "m", "--blocks", "0:4", "--initial-peers", "/a", "/b", "--no-direct",
                               "--max-cache-tokens", "100", "--train", "--run-id", "r", "--lr", "1e-3"))
    assert config == PeerConfig(model="m", blocks=(0, 4), initial_peers=["/a", "/b"], direct=False,
                                max_cache_tokens=100, training=SpanTrainingConfig(run_id="r", lr=1e-3))
    assert peer_config(parse("peer", "--model", "m", "--num-blocks", "2", "--new-swarm")).training is None
    train = train_config(parse("train", "--run-id", "x", "--data", "a", "b", "--seed", "3", "--no-progress",
                               "--save", "out"))
    assert train == TrainConfig(run_id="x", model=train.model, seed=3, show_progress=False, save_dir="out",
                                data=DataConfig(sources=("a", "b"), seed=3))


def test_shared_flags_are_the_same_in_every_command():
    shared = {*NETWORK, "dht_prefix", "metrics_port", "metrics_host", "new_swarm", "num_threads", "log_level"}
    seen: dict[str, tuple] = {}
    takers: dict[str, list[str]] = {}
    for command, parser in subparsers().items():
        for action in parser._actions:
            if action.dest in shared:
                help = action.help.replace("default: warning", "default: info")  # quiet one-shot commands
                shape = (type(action), action.option_strings, action.nargs, action.type, action.choices,
                         action.metavar, help)
                assert seen.setdefault(action.dest, shape) == shape, (command, action.dest)
                takers.setdefault(action.dest, []).append(command)
    assert sorted(takers["initial_peers"]) == ["dht", "export", "generate", "health", "peer", "train"]
    assert seen["initial_peers"][2] == "*"
    assert len(takers["log_level"]) == len(subparsers())
    assert parse("generate", "--prompt", "x")["log_level"] == "warning" and parse("dht")["log_level"] == "info"


def test_env_overrides_the_default_and_the_command_line_overrides_the_env():
    env = {"SWARMLM_MAX_CACHE_TOKENS": "100", "SWARMLM_INITIAL_PEERS": "/a, /b /c", "SWARMLM_DIRECT": "no",
           "SWARMLM_LOG_LEVEL": "DEBUG", "SWARMLM_TRAINING_LR": "0.5", "SWARMLM_PUBLIC_NAME": "",
           "SWARMLM_LR": "0.75"}  # `swarmlm train`'s: a training peer's span settings have their own
    s = parse("peer", "--model", "m", "--num-blocks", "1", env=env)
    assert (s["max_cache_tokens"], s["initial_peers"], s["direct"], s["log_level"]) == (100, ["/a", "/b", "/c"],
                                                                                       False, "debug")
    assert s["lr"] == 0.5 and s["public_name"] is None  # an empty variable counts as unset
    s = parse("peer", "--model", "m", "--num-blocks", "1", "--max-cache-tokens", "7", "--direct", env=env)
    assert (s["max_cache_tokens"], s["direct"]) == (7, True)
    with pytest.raises(ValueError, match=r"\$SWARMLM_MAX_CACHE_TOKENS: max_cache_tokens invalid literal"):
        parse("peer", "--model", "m", "--num-blocks", "1", env={"SWARMLM_MAX_CACHE_TOKENS": "many"})
    with pytest.raises(ValueError, match=r"\$SWARMLM_NEW_SWARM: new_swarm must be one of 1/true/yes/on"):
        parse("train", "--run-id", "x", env={"SWARMLM_NEW_SWARM": "maybe"})
    with pytest.raises(ValueError, match="torch_dtype must be one of float32, float16, bfloat16"):
        parse("peer", "--model", "m", "--num-blocks", "1", env={"SWARMLM_TORCH_DTYPE": "float64"})


def test_train_and_peer_training_read_their_own_env_vars_and_home_is_no_setting():
    assert parse("train", "--run-id", "x", env={"SWARMLM_LR": "0.5", "SWARMLM_TRAINING_LR": "0.25"})["lr"] == 0.5
    assert parse("peer", "--model", "m", "--num-blocks", "1", env={"SWARMLM_LR": "0.5"})["lr"] == 1e-4

    @dataclasses.dataclass
    class Home:
        home: str = dataclasses.field(default="", metadata=setting("a data directory"))

    with pytest.raises(TypeError, match="SWARMLM_HOME is reserved"):
        Flags(Home)


def test_config_file_below_env_and_flags_above_the_defaults(tmp_path):
    path = write(tmp_path, 'model = "m"\nnum-blocks = 2\nnew_swarm = true\nmax_cache_tokens = 10\n'
                           'request_timeout = 90\nlog_level = "WARNING"\ntrain = false\n'
                           '[training]\nlr = 0.25\nrun-id = "from-file"\n')
    s = parse("peer", "--config", path)
    assert (s["model"], s["num_blocks"], s["new_swarm"], s["max_cache_tokens"]) == ("m", 2, True, 10)
    assert s["request_timeout"] == 90.0 and isinstance(s["request_timeout"], float) and s["log_level"] == "warning"
    assert (s["lr"], s["run_id"], s["train"]) == (0.25, "from-file", False)
    s = parse("peer", "--config", path, "--max-cache-tokens", "30", env={"SWARMLM_MAX_CACHE_TOKENS": "20",
                                                                          "SWARMLM_TRAINING_LR": "0.5"})
    assert (s["max_cache_tokens"], s["lr"], s["device"]) == (30, 0.5, "cpu")
    # a flag (or env var) given for one of blocks/num_blocks drops the other one from the file
    config = peer_config(parse("peer", "--config", path, "--blocks", "0:3"))
    assert (config.blocks, config.num_blocks) == ((0, 3), None)
    config = peer_config(parse("peer", "--config", path, env={"SWARMLM_BLOCKS": "1:2"}))
    assert (config.blocks, config.num_blocks) == ((1, 2), None)
    with pytest.raises(ValueError, match="exactly one of blocks"):
        peer_config(parse("peer", "--config", path, env={"SWARMLM_BLOCKS": "1:2", "SWARMLM_NUM_BLOCKS": "3"}))


def test_train_reads_its_data_table_and_flag_names(tmp_path):
    path = write(tmp_path, 'run_id = "r"\nsave = "ckpt"\nprogress = false\nnew_swarm = true\n'
                           '[data]\ndata = ["a.txt", "b.txt"]\nshard_index = 1\nnum_shards = 2\n')
    config = train_config(parse("train", "--config", path, "--seed", "5"))
    assert (config.run_id, config.save_dir, config.show_progress, config.seed) == ("r", "ckpt", False, 5)
    assert config.data == DataConfig(sources=("a.txt", "b.txt"), shard_index=1, num_shards=2, seed=5)


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'max_cache' at the top level; valid keys: announce_maddrs, "
                                         r"average_state_every, .*max_cache_tokens.*; tables: \[training\]"):
        parse("peer", "--config", write(tmp_path, 'max_cache = 5\n'))
    with pytest.raises(ValueError, match=r"unknown key 'model' in \[training\]; valid keys: average_state_every"):
        parse("peer", "--config", write(tmp_path, '[training]\nmodel = "m"\n'))
    with pytest.raises(ValueError, match=r"unknown key 'network' at the top level"):
        parse("peer", "--config", write(tmp_path, '[network]\nhost_maddrs = []\n'))
    for text, message in [('max_cache_tokens = "many"', "max_cache_tokens invalid literal"),
                          ("max_cache_tokens = 1.5", r"max_cache_tokens cannot be 1.5 \(float\)"),
                          ("max_cache_tokens = true", r"max_cache_tokens cannot be True"),
                          ("new_swarm = 1", r"new_swarm cannot be 1 \(int\)"),
                          ('torch_dtype = "float64"', "torch_dtype must be one of"),
                          ("initial_peers = [1]", r"initial_peers cannot be \[1\]"),
                          ("blocks = [0]", r"blocks cannot be \[0\]"),
                          ('blocks = "0-4"', "blocks must look like A:B"),
                          ("model = ", "Invalid value"),
                          ('model = "m"\nmodel-x = 1', "unknown key 'model-x'"),
                          ('num_blocks = 1\nnum-blocks = 2', "num_blocks is given twice")]:
        with pytest.raises(ValueError, match=message):
            parse("peer", "--config", write(tmp_path, text + "\n"))
    with pytest.raises(ValueError, match="config file .*nope.toml"):
        parse("peer", "--config", str(tmp_path / "nope.toml"))
    assert main(["peer", "--config", write(tmp_path, "max_cache = 5\n")]) == 2


def test_blocks_accept_a_b_only(capsys):
    for bad in ("0-4", "a:b", "1:2:3"):
        with pytest.raises(SystemExit):
            parse("peer", "--model", "m", "--blocks", bad)
        assert "argument --blocks: must look like A:B (e.g. 0:4), got" in capsys.readouterr().err
    assert parse("peer", "--model", "m", "--blocks", " 3:5")["blocks"] == (3, 5)


def test_bool_flags_turn_on_and_off():
    base = ("peer", "--model", "m", "--num-blocks", "1", "--new-swarm")
    assert [peer_config(parse(*base, *flag)).direct for flag in ((), ("--direct",), ("--no-direct",))] == \
        [None, True, False]
    assert parse(*base, "--no-new-swarm")["new_swarm"] is False
    assert parse(*base, "--no-use-relay")["use_relay"] is False
    assert parse("train", "--run-id", "x", "--no-progress")["show_progress"] is False
    assert parse("train", "--run-id", "x", env={"SWARMLM_PROGRESS": "off"})["show_progress"] is False
    assert parse("train", "--run-id", "x", "--progress", env={"SWARMLM_PROGRESS": "0"})["show_progress"] is True


def test_required_settings_and_exclusive_blocks_are_reported():
    with pytest.raises(ValueError, match=r"missing setting run_id: give --run-id, \$SWARMLM_RUN_ID or run_id in"):
        parse("train")
    with pytest.raises(ValueError, match="missing setting model"):
        parse("peer", "--blocks", "0:1")
    with pytest.raises(ValueError, match="exactly one of blocks"):
        peer_config(parse("peer", "--model", "m", "--blocks", "0:1", "--num-blocks", "1", "--new-swarm"))
    assert main(["peer", "--model", "m", "--new-swarm"]) == 2


def test_peer_config_file_round_trip(tmp_path):
    flags = ("--model", "swarmlm-tiny-llama", "--blocks", "2:6", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/X",
             "--host-maddrs", "/ip4/0.0.0.0/tcp/31330", "--announce-maddrs", "/ip4/5.6.7.8/tcp/31330",
             "--identity-path", "k", "--no-direct", "--device", "cuda:0", "--torch-dtype", "float32",
             "--max-cache-tokens", "2048", "--request-timeout", "80", "--metrics-port", "0", "--train",
             "--run-id", "svc", "--lr", "0.002", "--averaging-timeout", "40")
    path = write(tmp_path, '''
        model = "swarmlm-tiny-llama"
        blocks = "2:6"
        initial-peers = ["/ip4/1.2.3.4/tcp/1/p2p/X"]
        host_maddrs = ["/ip4/0.0.0.0/tcp/31330"]
        announce_maddrs = ["/ip4/5.6.7.8/tcp/31330"]
        identity_path = "k"
        direct = false
        device = "cuda:0"
        torch_dtype = "float32"
        max_cache_tokens = 2048
        request_timeout = 80
        metrics_port = 0
        train = true
        [training]
        run_id = "svc"
        lr = 0.002
        averaging-timeout = 40
    ''')
    from_flags = peer_config(parse("peer", *flags))
    assert from_flags.training.averaging_timeout == 40.0 and from_flags.direct is False
    assert peer_config(parse("peer", "--config", path)) == from_flags
    flat = write(tmp_path, Path(path).read_text().replace("[training]", ""))  # the table is optional
    assert peer_config(parse("peer", "--config", flat)) == from_flags


def test_the_example_config_makes_a_peer():
    config = peer_config(parse("peer", "--config", str(EXAMPLE)))
    assert (config.model, config.num_blocks, config.metrics_port, config.training) == ("swarmlm-tiny-llama", 4,
                                                                                      9100, None)
    trained = peer_config(parse("peer", "--config", str(EXAMPLE), "--blocks", "0:4", "--train"))
    assert (trained.blocks, trained.num_blocks, trained.training) == ((0, 4), None, SpanTrainingConfig())


def test_declarations_are_checked():
    @dataclasses.dataclass
    class Odd:
        mapping: dict = dataclasses.field(default_factory=dict, metadata=setting("no flag for this"))

    with pytest.raises(TypeError, match="Odd.mapping: no setting type"):
        Flags(Odd)
    with pytest.raises(ValueError, match="PeerConfig has no setting 'nope'"):
        Flags(PeerConfig, only=("nope",))
    assert "0.2 = +20%" in subparsers()["peer"].format_help()
