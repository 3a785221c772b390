"""How many test images the export verifies on. Imports nothing, so that `stepnet export --help`
can name the figures without loading torch (export/verify.py applies them)."""

RECOMMENDED_SAMPLES = 64   # verification runs on this many where the test split has them; fewer: a warning
MIN_SAMPLES = 16           # the default floor (--min-verification-images): fewer fail the export
