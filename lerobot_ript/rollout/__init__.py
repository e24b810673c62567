"""Grouped rollout collection on LeRobot envs: init_hash, dynamic sampling, skip tracker."""
