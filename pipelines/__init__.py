"""Installed as ``latentdiff.pipelines`` (see pyproject.toml): the repository keeps pipelines at the top level."""

from latentdiff.pipelines.img2img import LatentDiffImg2ImgPipeline
from latentdiff.pipelines.inpaint import LatentDiffInpaintPipeline
from latentdiff.pipelines.latent_diff_pipeline import LatentDiffPipeline, LatentDiffPipelineOutput

__all__ = ["LatentDiffImg2ImgPipeline", "LatentDiffInpaintPipeline", "LatentDiffPipeline", "LatentDiffPipelineOutput"]
