"""Image pipeline: series selection, volume, phantom, models, analysis."""
