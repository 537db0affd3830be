"""Generated from proto/twopc/v1/twopc.proto by proto/generate.py. Do not edit."""
