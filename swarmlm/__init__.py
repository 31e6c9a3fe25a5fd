"""swarmlm: run and train large language models on a peer-to-peer swarm of volunteer machines."""

import warnings

__version__ = "0.1.0"

# hivemind 1.1.12 decorates two helpers it defines (hivemind/utils/math.py, hivemind/moe/server/layers/common.py)
# with `torch.jit.script` as it is imported, which torch deprecates (DeprecationWarning in 2.13, FutureWarning in
# 2.14). swarmlm runs neither helper. Once torch removes `torch.jit.script`, hivemind 1.1.12 cannot be imported:
# pyproject.toml keeps torch below 2.14 until hivemind drops it. This hides that one message, nothing else;
# tests/test_hf_compat.py checks that it is still hivemind's, and that importing swarmlm warns of nothing else.
JIT_SCRIPT_DEPRECATION = r"`torch\.jit\.script` is deprecated"
warnings.filterwarnings("ignore", message=JIT_SCRIPT_DEPRECATION)


def __getattr__(name):
    # lazy: `import swarmlm` stays light for peers and the CLI
    if name == "AutoDistributedModelForCausalLM":
        from swarmlm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(name)


__all__ = ["AutoDistributedModelForCausalLM", "__version__"]
