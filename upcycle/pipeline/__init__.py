"""The pipeline room: one YAML from a seed to a report (`upcycle run`), and the demo."""

from upcycle.pipeline.config import PipelineConfig
from upcycle.pipeline.run import Pipeline, run_pipeline

__all__ = ["Pipeline", "PipelineConfig", "run_pipeline"]
