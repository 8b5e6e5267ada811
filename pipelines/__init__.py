"""Installed as ``latentdiff.pipelines`` (see pyproject.toml): the repository keeps pipelines at the top level."""

from latentdiff.pipelines.latent_diff_pipeline import LatentDiffPipeline, LatentDiffPipelineOutput

__all__ = ["LatentDiffPipeline", "LatentDiffPipelineOutput"]
