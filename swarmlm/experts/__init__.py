"""The hosted unit: a span of a model's decoder layers, per-family adapters, and the wire protocol."""

from swarmlm.experts.families import ModelFamily, family_for_config
from swarmlm.experts.span import BlockSpan

__all__ = ["BlockSpan", "ModelFamily", "family_for_config"]
