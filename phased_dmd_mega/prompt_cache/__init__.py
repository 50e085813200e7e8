"""The prompt-embedding cache: written by ``phased-dmd encode-prompts`` (command.py), read by the
trainer and the sampler (reader.py); the on-disk format both agree on is format.py."""
