"""The offline AWQ quantizer: the same as `tinychat quantize`, runnable from a source checkout.

    python scripts/quantize_awq.py --model smollm2-135m-instruct --group-size 64 \
        --calib ../shared/data/calib/c4-sample.txt --output models/smollm2-135m-instruct-awq-w4-g64
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinychat.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
