"""swarmlm: run and train large language models on a peer-to-peer swarm of volunteer machines."""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `import swarmlm` stays light for peers and the CLI
    if name == "AutoDistributedModelForCausalLM":
        from swarmlm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(name)


__all__ = ["AutoDistributedModelForCausalLM", "__version__"]
