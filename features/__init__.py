"""Frozen-encoder feature extraction: one factory per encoder kind, the shard store and its reader."""
