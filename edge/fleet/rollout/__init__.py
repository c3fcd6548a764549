"""Staged model rollouts: the sans-IO ``planner`` (stages, gates, outcomes from the boxes' signed OTA events) and the
``driver`` that publishes the signed ``ota/update`` commands and records progress."""
