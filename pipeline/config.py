"""Typed configuration of the pipeline (the ``pipeline:`` section of ``config.yaml``).

Owned by ``pipeline/``; ``node.config`` embeds :class:`PipelineConfig`.
Every model forbids unknown keys so that a typo stops the node at start.
"""

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineConfig(_Strict):
    """Settings of series selection, volume reconstruction and analysis."""
