"""The former home of ProjectedAdam, now `lowmem.optim.pipeline.PipelineOptimizer` (kept importable)."""
from lowmem.optim.pipeline import PipelineOptimizer, ProjectedAdam  # noqa: F401
from lowmem.optim.pipeline_options import PipelineOptions, ProjectionOptions  # noqa: F401
