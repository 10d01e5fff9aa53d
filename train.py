"""Train SiT with REPA. Thin entry point: parse config -> build -> loop (the loop lives in repa_fast.engine).

python train.py                                   # the embedded demo (digits, tiny SiT, a few minutes on CPU)
python train.py --model SiT-XL/2 --data-dir DIR   # the reference recipe, reference flag names
deepspeed train.py --config configs/ds_sit_xl.json
"""

import sys

from repa_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
