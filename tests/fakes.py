"""Fakes shared by the loop's tests."""

from __future__ import annotations


class OneRankContext:
    """The loop's WorkerContext (platform/train/loop.py) for one in-process rank that keeps nothing:
    reports are dropped, there is nothing to restore or roll back to, and no metrics log."""

    rank, world_size = 0, 1
    takes_staging_dir = False

    def report(self, metrics, checkpoint_dir, name=None):
        pass

    def restore_dir(self):
        return None

    def fetch_checkpoint(self, name):
        raise FileNotFoundError(name)

    def run_storage(self):
        return None  # no metrics log

    def drain(self):
        pass
