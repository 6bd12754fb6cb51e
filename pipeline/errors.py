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


class UnreadableDicom(PipelineError):
    """A file is not DICOM, or one of its elements does not parse (wrong VR, length or
    value); selection skips it, volume building fails on it."""


class InferenceError(PipelineError):
    """The models could not be loaded or run."""


def print_error(exc: PipelineError, as_json: bool) -> int:
    """The command-line form of a pipeline failure: ``{"error", "message"}`` on stdout with
    ``--json``, else one line on stderr. Returns the exit status (1)."""
    import json
    import sys

    if as_json:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}, indent=2))
    else:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return 1
