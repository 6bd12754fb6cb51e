"""DICOM results: TID 1500 SR, SEG and preview series (highdicom).

The node calls :func:`sr_writer.results.write_results` with the analysed series' headers,
its :class:`~pipeline.volume.Volume` and :class:`~pipeline.findings.Findings`; the
settings are :class:`sr_writer.config.ResultsConfig`; see ``docs/results.md``. The package
itself imports nothing, so that ``pipeline.config`` can embed ``ResultsConfig`` without a
cycle.
"""
