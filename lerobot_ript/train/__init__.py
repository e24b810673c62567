"""Training: the RL loop, checkpoints and Hub pushes."""
