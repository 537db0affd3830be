"""Generated from proto/twopc/ by proto/generate.py. Do not edit."""
