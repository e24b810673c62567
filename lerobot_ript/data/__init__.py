"""Datasets of lerobot_ript: the episode writer, demo recording and the training dataset."""
