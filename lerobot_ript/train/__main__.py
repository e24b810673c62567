"""`accelerate launch -m lerobot_ript.train --config_path configs/<x>.yaml [--a.b=c ...]`."""

from lerobot_ript.train.cli import main

if __name__ == "__main__":
    main()
