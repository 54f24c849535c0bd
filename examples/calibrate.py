"""Round-to-nearest vs GPTQ-calibrated NF4 on the bundled model, measured against one bf16 reference in one run.

    python examples/calibrate.py [WINDOWS]

WikiText-2 test windows of 256 tokens (default 16; 0 = the whole split, about 10 minutes on 2 CPU cores). On a
short prefix this small model's perplexity barely moves under 4-bit rounding, so read the KL column: calibration
cuts the drift from the bf16 model about threefold. To keep the calibrated weights, write them as an ordinary
pre-quantized checkpoint (plain bitsandbytes layout, loads in transformers too):

    qopt.calibrate_checkpoint(path, "out-dir", qopt.CalibrationConfig(quantization="nf4"))
    # or: qopt quantize PATH --method calibrated --bits 4 --out out-dir
"""
import sys

import qopt
from qopt.bundled import bundled_model_dir

windows = int(sys.argv[1]) if len(sys.argv) > 1 else 16
report = qopt.compare_precisions(bundled_model_dir(), ["nf4", "nf4-calibrated"], max_windows=windows or None,
                                 progress=False)
print(report.to_markdown())
rtn, calibrated = report.row("nf4"), report.row("nf4-calibrated")
print(f"KL to bf16: round-to-nearest {rtn.kl:.2e}, calibrated {calibrated.kl:.2e} ({calibrated.kl / rtn.kl:.2f}x)")
