"""Named failures of the pipeline.

Each message states the rule that was broken, so that the job report on disk
tells an admin what to fix (highdicom style: ``ValueError('At least one source
image is required.')``).
"""


class PipelineError(Exception):
    """Base class: the series could not be analysed."""


class SeriesRejected(PipelineError):
    """No series of the study meets the selection rules, or the chosen one breaks a rule."""


class VolumeError(PipelineError):
    """The slices of a series cannot be assembled into one volume."""


class InferenceError(PipelineError):
    """The models could not be loaded or run."""
