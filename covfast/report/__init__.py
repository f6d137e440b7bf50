"""Report writers: report.json, NIfTI masks in the input's grid, preview.png."""
